#!/usr/bin/env bash
# Submit a release as a SLURM job array of N shards plus a finalize job that runs only if every
# shard succeeded (--dependency=afterok) and then checks completeness and exports the catalogue.
#
#   deploy/slurm/submit-array.sh [options] MANIFEST OUT_DIR [-- more sbatch arguments for both jobs]
#
# Options:
#   -n, --shards N         array size: tasks 0..N-1, each runs `surveypipe run --shard I/N` (default 4)
#   -o, --export DEST      merged catalogue written by the finalize job (default OUT_DIR/catalog.parquet)
#   -f, --format FMT       parquet (default) or fits
#   -p, --partition P      partition for both jobs
#   -A, --account A        account for both jobs
#   -t, --time T           time limit per shard (default: array.sbatch's, 02:00:00)
#       --mem M            memory per shard (default: array.sbatch's, 4G)
#       --max-parallel K   at most K shards at once (--array=0-(N-1)%K)
#       --name NAME        job name of both jobs (default surveypipe-<basename OUT_DIR>)
#       --singleton        start only after earlier jobs of the same name and user ended: scheduled
#                          runs of one release then never overlap (see scrontab.example)
#       --dry-run          print the sbatch commands, submit nothing
#
# Prints ARRAY_JOB_ID=... and FINALIZE_JOB_ID=... on stdout (eval-able); messages go to stderr.
# The command run in the jobs is $SURVEYPIPE (may hold arguments, e.g. "apptainer exec
# surveypipe.sif surveypipe"), else the `surveypipe` found on PATH now. Logs: OUT_DIR/logs/.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "submit-array: $*" >&2; exit 2; }

shards=4 dest="" format=parquet partition="" account="" time_limit="" mem="" max_parallel=""
name="" singleton=0 dry_run=0
positional=() extra=()
while (($#)); do
    case $1 in
        -n|--shards) shards=${2:?}; shift 2 ;;
        -o|--export) dest=${2:?}; shift 2 ;;
        -f|--format) format=${2:?}; shift 2 ;;
        -p|--partition) partition=${2:?}; shift 2 ;;
        -A|--account) account=${2:?}; shift 2 ;;
        -t|--time) time_limit=${2:?}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --max-parallel) max_parallel=${2:?}; shift 2 ;;
        --name) name=${2:?}; shift 2 ;;
        --singleton) singleton=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) positional+=("$1"); shift ;;
    esac
done
((${#positional[@]} == 2)) || { usage >&2; exit 2; }
[[ $shards =~ ^[1-9][0-9]*$ ]] || die "--shards must be a positive integer, not '$shards'"
[[ $format == parquet || $format == fits ]] || die "--format must be parquet or fits"
[[ -z $max_parallel || $max_parallel =~ ^[1-9][0-9]*$ ]] || die "--max-parallel must be a positive integer"

manifest=$(realpath -m "${positional[0]}")
out=$(realpath -m "${positional[1]}")
[[ -f $manifest ]] || die "manifest $manifest does not exist"
dest=$(realpath -m "${dest:-$out/catalog.$format}")
name=${name:-surveypipe-$(basename "$out")}

if [[ -z ${SURVEYPIPE:-} ]]; then
    SURVEYPIPE=$(command -v surveypipe) || die "no surveypipe on PATH: activate its environment or set SURVEYPIPE"
fi
export SURVEYPIPE   # sbatch passes the environment on (--export=ALL, its default)

common=(--parsable --job-name="$name")
[[ -n $partition ]] && common+=(--partition="$partition")
[[ -n $account ]] && common+=(--account="$account")

array=("${common[@]}" --array="0-$((shards - 1))${max_parallel:+%$max_parallel}"
       --output="$out/logs/%x-%A_%a.out")
[[ -n $time_limit ]] && array+=(--time="$time_limit")
[[ -n $mem ]] && array+=(--mem="$mem")
((singleton)) && array+=(--dependency=singleton)
array+=("${extra[@]}" "$here/array.sbatch" "$manifest" "$out" "$shards")

submit() { # prints the job id
    if ((dry_run)); then
        { printf 'sbatch'; printf ' %q' "$@"; printf '\n'; } >&2
        echo "DRYRUN$RANDOM"
        return
    fi
    local id
    id=$(sbatch "$@") || die "sbatch failed: sbatch $*"
    echo "${id%%;*}"   # --parsable prints ID or ID;CLUSTER
}

((dry_run)) || mkdir -p "$out/logs"
array_id=$(submit "${array[@]}")
final=("${common[@]}" --dependency="afterok:$array_id" --kill-on-invalid-dep=yes
       --output="$out/logs/%x-finalize-%j.out" "${extra[@]}"
       "$here/finalize.sbatch" "$manifest" "$out" "$dest" "$format")
final_id=$(submit "${final[@]}")

echo "submit-array: $shards shards of $manifest -> $out: array job $array_id, finalize job $final_id -> $dest" >&2
echo "ARRAY_JOB_ID=$array_id"
echo "FINALIZE_JOB_ID=$final_id"
