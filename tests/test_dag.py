"""The DAG is derived from declarations and checked before any work starts."""
import pytest

from helpers_stages import make_stage
from pipeline.config import PipelineConfig
from pipeline.dag import Dag
from pipeline.errors import ConfigError, DagError


def test_order_follows_declarations_not_list_order():
    stages = [make_stage("c", ("b",), ("c",)), make_stage("a", ("exposure",), ("a",)), make_stage("b", ("a",), ("b",))]
    assert [s.name for s in Dag(stages).order] == ["a", "b", "c"]


def test_missing_producer_is_refused_naming_stage_and_product():
    with pytest.raises(DagError, match=r"stage 'b' requires 'nothing', which no stage provides"):
        Dag([make_stage("a", ("exposure",), ("a",)), make_stage("b", ("nothing",), ("b",))])


def test_two_producers_are_refused():
    with pytest.raises(DagError, match=r"product 'x' is provided by two stages: 'a' and 'b'"):
        Dag([make_stage("a", ("exposure",), ("x",)), make_stage("b", ("exposure",), ("x",))])


def test_cycle_is_refused_with_its_path():
    with pytest.raises(DagError, match=r"cycle: .*a -> .*b -> .*a|cycle: .*b -> .*a -> .*b"):
        Dag([make_stage("a", ("y",), ("x",)), make_stage("b", ("x",), ("y",))])


def test_target_runs_only_the_sub_dag_it_needs():
    stages = [make_stage("a", ("exposure",), ("a",)), make_stage("b", ("a",), ("b",)),
              make_stage("c", ("a",), ("c",)), make_stage("d", ("b",), ("d",))]
    dag = Dag(stages)
    assert [s.name for s in dag.needed_for(["b"])] == ["a", "b"]
    assert [s.name for s in dag.needed_for(["d", "c"])] == ["a", "b", "c", "d"]
    assert dag.downstream_of("b") == {"b", "d"}
    with pytest.raises(DagError, match="unknown target 'zzz'"):
        dag.needed_for(["zzz"])


def test_optional_input_wired_only_when_provided():
    from pipeline.stage import Stage

    class Opt(Stage):
        name, version, requires, optional, provides = "opt", "1", ("exposure",), ("mask",), {"o": "o"}

    assert Dag([Opt()]).inputs(Opt()) == ["exposure"]
    dag = Dag([Opt(), make_stage("m", ("exposure",), ("mask",))])
    assert dag.inputs(Opt()) == ["exposure", "mask"]
    assert [s.name for s in dag.order] == ["m", "opt"]


def test_stage_config_errors_name_stage_and_field():
    cfg = PipelineConfig(stages="stages:CLASSICAL_STAGES", stage_config={"detection": {"thresh": -1}})
    with pytest.raises(ConfigError, match=r"stage 'detection' config invalid: thresh"):
        cfg.stage_configs(cfg.load_stages())
    cfg = PipelineConfig(stages="stages:CLASSICAL_STAGES", stage_config={"nosuch": {}})
    with pytest.raises(ConfigError, match=r"unknown stage"):
        cfg.stage_configs(cfg.load_stages())
    with pytest.raises(ConfigError, match="cannot import"):
        PipelineConfig(stages="nosuch.module:X").load_stages()
