"""Recipes: presets validate, bad input gives one line naming the key, --set overrides, ordering plans."""

from __future__ import annotations

import pytest

from cli_helpers import cli_error
from prunetune.config import apply_overrides, load_recipe, preset_names, recipe_to_dict, validate_recipe
from prunetune.errors import PrunetuneError
from prunetune.methods.ordering import plan


def test_presets_all_validate():
    names = preset_names()
    assert {"quickstart", "payt", "wanda-lora", "sparsegpt-2of4", "order-study"} <= set(names)
    for n in names:
        r = load_recipe(n)
        assert r.name == n and r.stages
    q = load_recipe("quickstart")
    assert [s.type for s in q.stages] == ["evaluate", "prune", "evaluate", "finetune", "evaluate", "export"]
    assert (q.model.name, q.prune.method, q.prune.sparsity, q.data.calib) == ("smollm2-135m", "wanda", 0.5, "bbc-news")
    assert q.notes  # the sizing is stated


@pytest.mark.parametrize("data, expected", [
    ({"stages": ["evaluate"], "prune": {"method": "foo"}},
     "prune.method: 'foo' is not allowed; choose one of: 'wanda', 'magnitude', 'l1-global', 'l2-cols', 'sparsegpt'"),
    ({"stages": ["evaluate"], "prune": {"metod": "wanda"}}, "unknown key 'prune.metod'; allowed keys: method, sparsity"),
    ({"stages": ["evalx"]}, "stages.0.type: 'evalx' is not allowed; choose one of: 'evaluate', 'prune'"),
    ({"stages": [{"type": "prune", "sparsty": 0.3}]}, "unknown key 'stages.0.sparsty'; allowed keys: method"),
    ({"stages": [{"type": "prune", "sparsity": 1.5}]}, "stages.0.sparsity: Input should be less than 1"),
    ({"stages": ["prune"], "bogus": 1}, "unknown key 'bogus'; allowed keys: name, description, seed, model"),
    ({"stages": ["prune"], "prune": {"pattern": "4:2"}}, "prune.pattern: N:M pattern needs 0 < N < M"),
    ({"stages": [{"type": "export", "x": 1}]}, "stages.0: stage 'export' takes no options"),
    ({"stages": ["payt"], "payt": {"start": 0.5, "end": 0.4}}, "payt: end (0.4) must be after start (0.5)"),
])
def test_bad_recipes_one_line(data, expected):
    with pytest.raises(PrunetuneError) as ei:
        validate_recipe(data, "r.yaml")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("r.yaml: ")
    assert expected in msg


def test_set_overrides_types_and_stage_items():
    raw = {"stages": ["evaluate", "prune"], "eval": {"max_windows": 4}}
    r = validate_recipe(apply_overrides(raw, [
        "prune.sparsity=0.6", "stages.1.method=magnitude", "eval.harness=[a, b]", "eval.max_windows=null",
        "model.name=tiny-llama"]))
    assert r.prune.sparsity == 0.6 and r.eval.harness == ["a", "b"] and r.eval.max_windows is None
    assert r.stage_spec(1).method == "magnitude" and r.stage_spec(1).sparsity == 0.6
    assert r.model.name == "tiny-llama"
    assert recipe_to_dict(r)["stages"] == ["evaluate", {"type": "prune", "method": "magnitude"}]
    assert raw["stages"] == ["evaluate", "prune"]  # the input is not mutated
    for bad, msg in [("prune", "--set needs key=value"), ("stages.7.method=x", "no item 7"),
                     (".x=1", "malformed")]:
        with pytest.raises(PrunetuneError, match=msg):
            apply_overrides(raw, [bad])


def test_cli_errors_are_one_line(capsys):
    for argv, needle in [(["run", "nope"], "neither a preset"),
                         (["run", "--set", "prune.method=foo"], "prune.method: 'foo' is not allowed"),
                         (["run", "--resume"], "--resume needs --out")]:
        cli_error(argv, capsys, needle=needle)


def test_ordering_plans_same_budget_and_target():
    assert plan("prune_ft", 0.7, 3, 9) == [("prune", 0.7), ("ft", 9)]
    assert plan("ft_prune", 0.7, 3, 9) == [("ft", 9), ("prune", 0.7)]
    pf = plan("iter_pf", 0.6, 3, 7)
    assert [a for a, _ in pf] == ["prune", "ft"] * 3
    assert [v for a, v in pf if a == "prune"] == [0.2, 0.4, 0.6]
    assert sum(v for a, v in pf if a == "ft") == 7
    fp = plan("iter_fp", 0.6, 3, 7)
    assert [a for a, _ in fp] == ["ft", "prune"] * 3 and fp[-1] == ("prune", 0.6)
    with pytest.raises(PrunetuneError, match="at least one fine-tuning step per round"):
        plan("iter_pf", 0.5, 4, 3)
    with pytest.raises(PrunetuneError, match="unknown ordering"):
        plan("sideways", 0.5, 2, 2)
