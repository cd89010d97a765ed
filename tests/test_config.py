"""Tests for pipeline.config: loading, validation messages, freezing and the params helpers."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pydantic
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import (
    EPG_METHODS,
    HELD_OUT_SPLITS,
    TASK_FAMILIES,
    TASK_SPLITS,
    ConfigError,
    EpgEvalConfig,
    EvolveConfig,
    MetagradConfig,
    PipelineConfig,
    flatten,
    load_params,
    params_hash,
    section_dict,
)
from pipeline.devices import resolve_device
from pipeline.profiles import read_params

PROJECT = Path(__file__).resolve().parents[1]
PARAM_FILES = [PROJECT / "params.yaml", *sorted((PROJECT / "params").glob("*.yaml"))]


@pytest.fixture(scope="module")
def raw_params() -> dict:
    return yaml.safe_load((PROJECT / "params.yaml").read_text())


@pytest.fixture
def write_params(tmp_path, raw_params):
    """Write a mutated copy of params.yaml and return its path."""

    def write(mutate) -> Path:
        data = copy.deepcopy(raw_params)
        mutate(data)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def config_error_lines(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_params(path)
    return info.value.lines


# ------------------------------------------------------------------------------------- committed files
@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.relative_to(PROJECT).as_posix())
def test_committed_params_files_load_and_round_trip(path):
    config = load_params(path)
    assert isinstance(config, PipelineConfig)
    again = PipelineConfig.model_validate(config.model_dump(by_alias=True))
    assert again == config
    # the aliased field survives the round trip under its YAML name
    assert "lambda" in config.model_dump(by_alias=True)["metagrad"]
    assert again.metagrad.lambda_ == read_params(path)["metagrad"]["lambda"]


def test_default_params_yaml_has_expected_values():
    config = load_params(PROJECT / "params.yaml")
    assert config.prepare.games == ["pong"]
    assert config.prepare.task_families == ["point_goal", "random_cartpole"]
    assert config.evolve.popsize == 16 and config.evolve.antithetic is True
    assert config.metagrad.variants[0] == "impala"


def test_configs_are_frozen():
    config = load_params(PROJECT / "params.yaml")
    with pytest.raises(pydantic.ValidationError):
        config.seed = 1
    with pytest.raises(pydantic.ValidationError):
        config.evolve.popsize = 4
    with pytest.raises(pydantic.ValidationError):
        config.metagrad.meta.init_gamma = 0.5
    assert config.seed == 0 and config.evolve.popsize == 16


# ------------------------------------------------------------------------------------- file-level errors
def test_missing_file_is_a_config_error(tmp_path):
    lines = config_error_lines(tmp_path / "nope.yaml")
    assert lines == [f"{tmp_path / 'nope.yaml'}: file not found"]


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: [0\n")
    (line,) = config_error_lines(path)
    assert "not valid YAML" in line


def test_non_mapping_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    (line,) = config_error_lines(path)
    assert "expected a mapping of sections" in line
    assert "prepare" in line and "metagrad" in line


def test_missing_required_section_is_named(write_params):
    (line,) = config_error_lines(write_params(lambda d: d.pop("prepare")))
    assert "prepare: required key is missing" in line


# ------------------------------------------------------------------------------------- one bad key
def test_unknown_key_lists_allowed_keys_at_that_level(write_params):
    path = write_params(lambda d: d["evolve"].update(popsiz=3))
    (line,) = config_error_lines(path)
    assert line.startswith(f"{path}: evolve.popsiz: unknown key")
    allowed = line.split("allowed here:")[1]
    assert "popsize" in allowed and "generations" in allowed and "inner" in allowed
    assert "games" not in allowed  # keys of other sections are not offered


def test_unknown_nested_key_lists_keys_of_the_nested_section(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["metagrad"]["env"].update(frame_skip=4)))
    assert "metagrad.env.frame_skip: unknown key" in line
    assert line.endswith("allowed here: frameskip, stack, noop_max, max_episode_frames, env_threads")


def test_unknown_top_level_key(write_params):
    (line,) = config_error_lines(write_params(lambda d: d.update(evolv={})))
    assert "evolv: unknown key" in line
    assert line.endswith("allowed here: seed, tracking, prepare, evolve, metagrad, maml, evaluate")


def test_aliased_key_is_offered_by_its_yaml_name(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["metagrad"].update(lamda=0.9)))
    assert "metagrad.lamda: unknown key" in line
    assert ", lambda," in line and "lambda_" not in line


def test_wrong_type_names_key_and_value(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["evolve"].update(generations="many")))
    assert "evolve.generations = 'many'" in line
    assert "valid integer" in line


@pytest.mark.parametrize(
    "section, key, value, bound",
    [
        (("evolve",), "popsize", -4, "greater than or equal to 2"),
        (("metagrad",), "gamma", 1.5, "less than 1"),
        (("metagrad",), "gamma", 0, "greater than 0"),
        (("metagrad", "meta"), "init_lambda", 1.0, "less than 1"),
        (("evolve", "inner"), "lr", -0.1, "greater than 0"),
        ((), "seed", -1, "greater than or equal to 0"),
    ],
)
def test_out_of_range_value_names_key_value_and_bound(write_params, section, key, value, bound):
    def mutate(data):
        target = data
        for part in section:
            target = target[part]
        target[key] = value

    (line,) = config_error_lines(write_params(mutate))
    dotted = ".".join([*section, key])
    assert f": {dotted} = {value!r}: " in line
    assert bound in line


def test_literal_outside_allowed_values_names_the_choices(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["metagrad"].update(network="resnet50")))
    assert "metagrad.network = 'resnet50'" in line
    assert "'nature'" in line and "'impala_resnet'" in line


def test_list_item_literal_error_names_index(write_params):
    (line,) = config_error_lines(
        write_params(lambda d: d["prepare"].update(task_families=["point_goal", "ant"]))
    )
    assert "prepare.task_families.1 = 'ant'" in line
    assert "point_goal" in line and "random_cartpole" in line


def test_unknown_ale_game_suggests_close_match(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["prepare"].update(games=["pongg"])))
    assert "prepare.games = ['pongg']" in line
    assert "unknown ALE game 'pongg'" in line
    assert "did you mean pong" in line
    assert "python -m pipeline games" in line


def test_unknown_metagrad_game_is_rejected_too(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["metagrad"].update(games=["breakoutt"])))
    assert "metagrad.games" in line and "did you mean breakout" in line


def test_duplicate_games_are_rejected(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["prepare"].update(games=["pong", "pong"])))
    assert "prepare.games" in line and "more than once" in line


# ------------------------------------------------------------------------------------- cross-field rules
def test_odd_popsize_with_antithetic_is_rejected(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["evolve"].update(popsize=15, antithetic=True)))
    assert ": evolve = " in line
    assert "popsize (15) must be even when antithetic sampling is on" in line


def test_odd_popsize_without_antithetic_is_fine(write_params):
    config = load_params(write_params(lambda d: d["evolve"].update(popsize=15, antithetic=False)))
    assert config.evolve.popsize == 15


def test_metagrad_games_must_be_prepared(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["metagrad"].update(games=["breakout"])))
    assert "metagrad.games ['breakout'] must also be listed in prepare.games" in line


def test_evolve_family_must_be_a_prepared_task_family(write_params):
    def unprepared_family(d):
        d["prepare"].update(task_families=["random_cartpole"])
        d["evolve"].update(family="point_goal")

    (line,) = config_error_lines(write_params(unprepared_family))
    assert "evolve.family 'point_goal' must be listed in prepare.task_families" in line


def test_lifetime_steps_must_be_a_multiple_of_update_every(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["evolve"]["inner"].update(lifetime_steps=2000)))
    assert ": evolve.inner = " in line
    assert "lifetime_steps (2000) must be a multiple of update_every (64)" in line


def test_evaluation_lifetime_must_be_a_multiple_of_the_evolved_update_every(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["evaluate"]["epg"].update(lifetime_steps=1000)))
    assert (
        "evaluate.epg.lifetime_steps (1000) must be a multiple of the evolved loss's update_every (64)"
        in line
    )


def test_buffer_too_short_for_loss_net_convolutions(write_params):
    def mutate(data):
        data["evolve"]["inner"].update(lifetime_steps=64, update_every=32, buffer_size=32)
        data["evolve"]["loss_net"].update(conv_kernels=[30, 4], conv_strides=[5, 2])

    (line,) = config_error_lines(write_params(mutate))
    assert "inner.buffer_size (32) is too short" in line


def test_metagrad_variants_must_include_impala(write_params):
    (line,) = config_error_lines(write_params(lambda d: d["metagrad"].update(variants=["gamma", "lambda"])))
    assert "metagrad.variants = ['gamma', 'lambda']" in line
    assert "must include 'impala'" in line


# ------------------------------------------------------------------------------------- many bad keys
def test_each_bad_key_gets_its_own_line(write_params):
    def mutate(data):
        data["evolve"]["popsiz"] = 3
        data["evolve"]["generations"] = "many"
        data["metagrad"]["gamma"] = 1.5
        data["metagrad"]["network"] = "resnet50"
        data["prepare"]["games"] = ["pongg"]

    path = write_params(mutate)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    lines = info.value.lines
    assert len(lines) == 5
    assert all(line.startswith(f"{path}: ") for line in lines)
    keys = sorted(re.match(r"[\w.]+", line.removeprefix(f"{path}: ")).group() for line in lines)
    assert keys == [
        "evolve.generations",
        "evolve.popsiz",
        "metagrad.gamma",
        "metagrad.network",
        "prepare.games",
    ]
    assert str(info.value) == "\n".join(lines)


# ------------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(half=st.integers(min_value=1, max_value=10_000))
def test_any_even_popsize_validates_with_antithetic(half):
    assert EvolveConfig(popsize=2 * half, antithetic=True).popsize == 2 * half


@settings(max_examples=40, deadline=None)
@given(half=st.integers(min_value=1, max_value=10_000))
def test_any_odd_popsize_fails_with_antithetic(half):
    with pytest.raises(pydantic.ValidationError, match="must be even"):
        EvolveConfig(popsize=2 * half + 1, antithetic=True)


@settings(max_examples=60, deadline=None)
@given(gamma=st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True))
def test_any_gamma_strictly_between_0_and_1_validates(gamma):
    config = MetagradConfig(games=["pong"], variants=["impala"], gamma=gamma)
    assert config.gamma == gamma


@settings(max_examples=40, deadline=None)
@given(
    gamma=st.one_of(
        st.floats(max_value=0, allow_nan=False),
        st.floats(min_value=1, allow_nan=False),
    )
)
def test_any_gamma_outside_open_unit_interval_fails(gamma):
    with pytest.raises(pydantic.ValidationError):
        MetagradConfig(games=["pong"], variants=["impala"], gamma=gamma)


# ------------------------------------------------------------------------------------- helpers
def test_flatten_joins_nested_keys_with_dots_and_keeps_lists():
    data = {"seed": 0, "evolve": {"popsize": 16, "inner": {"ppo": {"clip": 0.2}, "policy_hidden": [64, 64]}}}
    assert flatten(data) == {
        "seed": 0,
        "evolve.popsize": 16,
        "evolve.inner.ppo.clip": 0.2,
        "evolve.inner.policy_hidden": [64, 64],
    }
    assert flatten({"a": 1}, prefix="p.") == {"p.a": 1}


def test_params_hash_is_stable_and_pinned():
    section = {"seed": 0, "evolve": {"popsize": 16, "sigma": 0.05}}
    assert params_hash(section) == "09dfd9e811b25b04"
    assert params_hash(copy.deepcopy(section)) == params_hash(section)


def test_params_hash_ignores_dict_key_order():
    a = {"seed": 0, "evolve": {"popsize": 16, "sigma": 0.05, "inner": {"lr": 0.1, "epochs": 1}}}
    b = {"evolve": {"inner": {"epochs": 1, "lr": 0.1}, "sigma": 0.05, "popsize": 16}, "seed": 0}
    assert params_hash(a) == params_hash(b)


def test_params_hash_changes_when_a_value_changes():
    base = {"seed": 0, "evolve": {"popsize": 16, "inner": {"lr": 0.1}}}
    hashes = {
        params_hash(base),
        params_hash({"seed": 1, "evolve": {"popsize": 16, "inner": {"lr": 0.1}}}),
        params_hash({"seed": 0, "evolve": {"popsize": 18, "inner": {"lr": 0.1}}}),
        params_hash({"seed": 0, "evolve": {"popsize": 16, "inner": {"lr": 0.2}}}),
        params_hash({"seed": 0, "evolve": {"popsize": 16, "inner": {"lr": [0.1]}}}),
    }
    assert len(hashes) == 5
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)


def test_section_dict_holds_seed_and_the_stage_section_as_plain_data():
    config = load_params(PROJECT / "params.yaml")
    section = section_dict(config, "metagrad")
    assert list(section) == ["seed", "metagrad"]
    assert section["seed"] == 0
    assert section["metagrad"]["lambda"] == 1.0 and "lambda_" not in section["metagrad"]
    assert section["metagrad"]["env"]["frameskip"] == 4
    assert section["metagrad"]["meta"]["grad_mode"] == "jvp"
    prepare = section_dict(config, "prepare")
    assert prepare == {
        "seed": 0,
        "prepare": {
            "games": ["pong"],
            "task_families": ["point_goal", "random_cartpole"],
            "num_train_tasks": 64,
            "num_test_tasks": 16,
            "num_ood_tasks": 16,
        },
    }


def test_stage_hash_only_depends_on_its_own_section(raw_params):
    base = PipelineConfig.model_validate(raw_params)
    changed = copy.deepcopy(raw_params)
    changed["metagrad"]["frames"] = 1234
    other = PipelineConfig.model_validate(changed)
    assert params_hash(section_dict(base, "evolve")) == params_hash(section_dict(other, "evolve"))
    assert params_hash(section_dict(base, "metagrad")) != params_hash(section_dict(other, "metagrad"))


def test_device_params_resolve_with_errors_that_name_the_key():
    assert resolve_device("cpu", "evolve.device") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"evaluate\.epg\.device is 'tpu'; allowed: auto, cpu, cuda"):
        resolve_device("tpu", "evaluate.epg.device")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"evolve\.device is 'cuda' but no CUDA device"):
            resolve_device("cuda", "evolve.device")


# ---------------------------------------------------------------------------------- one list per concept
def test_each_concept_is_listed_once_and_everything_is_built_from_it(write_params):
    from pipeline.envs.tasks import FAMILIES, SPLITS
    from pipeline.evaluation.report import METHOD_LABELS, VARIANT_LABELS

    assert tuple(FAMILIES) == TASK_FAMILIES  # one implementation per listed family, in order
    assert SPLITS == TASK_SPLITS and HELD_OUT_SPLITS == ("test", "ood")
    assert EpgEvalConfig().methods == list(EPG_METHODS) and EpgEvalConfig().splits == ["test", "ood"]
    assert set(METHOD_LABELS) == {*EPG_METHODS, "champion"}
    assert VARIANT_LABELS == {
        "impala": "IMPALA {}",
        "lambda": "{λ}",
        "gamma": "{γ}",
        "gamma_lambda": "{γ, λ}",
    }
    with pytest.raises(ConfigError, match="'point_goal', 'random_cartpole' or 'random_hopper'"):
        load_params(write_params(lambda p: p["evolve"].update(family="ant")))
    with pytest.raises(ConfigError, match="'impala', 'lambda', 'gamma' or 'gamma_lambda'"):
        load_params(write_params(lambda p: p["metagrad"].update(variants=["impala", "delta"])))


# ---------------------------------------------------------------------------------- params reference
def _models(model: type[pydantic.BaseModel]):
    yield model
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, pydantic.BaseModel):
            yield from _models(field.annotation)


def test_every_param_is_documented_by_its_field_docstring():
    undocumented = [
        f"{model.__name__}.{name}"
        for model in _models(PipelineConfig)
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert undocumented == []


def test_committed_params_reference_is_up_to_date():
    from pipeline.params_doc import render

    committed = (PROJECT / "docs" / "params.md").read_text()
    assert committed == render(), "docs/params.md is stale: run `python -m pipeline params-doc`"
    assert "| `metagrad.lambda` | float, > 0, <= 1 | `1.0` |" in committed  # aliases by their YAML key
    assert "| `prepare.games` | list of str (length >= 1) | *required* |" in committed


# ---------------------------------------------------------------------------------- profile overlays
# params_hash of each profile's whole config: the overlays gave exactly the configs of the former full
# copies of params.yaml (paper 1606f3e950d3c1b2, learn 011543abf5f0854e); learn then gained seeds
# [0, 1, 2], two concurrent cells and 30 evaluation episodes; both changed when MAML moved to EPG's
# task family (random_cartpole in params.yaml, random_hopper in paper) and evaluate compared MAML with EPG;
# all three when evaluate.epg.lifetime_steps came (one evaluation budget for every method: null in learn,
# 81 920 in paper, 16 384 in compare, which also gave MAML full-length episodes and 100 iterations).
# learn then ran three cells at a time (metagrad.ray only: cells' checkpoints and agents are unchanged),
# then took entropy_cost 0.003 (its {} baseline failed +10 on seed 2 at 0.01: docs/results.md).
# then 32 envs x 5 steps, constant lr 1.2e-3 and entropy_cost 0.01 (its {} baseline passes +10 on
# seeds 0-2; every 16-env setting failed on one: docs/results.md), then meta lr 1e-4 (1e-3 held
# {gamma, lambda} back on seeds 0 and 1; {} cells ignore the meta-learner: docs/results.md).
# A changed hash means a profile changed: say why.
PROFILE_HASHES = {"paper": "1ea79b57a6d872f5", "learn": "6fbc2328a41d6f02", "compare": "c8695fb7f11d86d0"}


@pytest.mark.parametrize("name", sorted(PROFILE_HASHES))
def test_profile_overlays_give_the_configs_of_the_former_full_copies(name):
    config = load_params(PROJECT / "params" / f"{name}.yaml")
    assert params_hash(config.model_dump(mode="json", by_alias=True)) == PROFILE_HASHES[name]
    overlay = yaml.safe_load((PROJECT / "params" / f"{name}.yaml").read_text())
    assert overlay.pop("overlay_of") == "../params.yaml"
    base = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for section, values in overlay.items():  # an overlay holds only what differs
        if isinstance(values, dict):
            assert all(base[section].get(key) != value for key, value in values.items()), section
        else:
            assert base[section] != values, section


def test_deep_merge_merges_mappings_and_replaces_everything_else():
    from pipeline.profiles import deep_merge

    base = {"a": {"x": 1, "y": [1, 2], "z": {"p": 1}}, "b": 2}
    merged = deep_merge(base, {"a": {"y": [3], "z": {"q": 2}}, "c": 3})
    assert merged == {"a": {"x": 1, "y": [3], "z": {"p": 1, "q": 2}}, "b": 2, "c": 3}
    assert base == {"a": {"x": 1, "y": [1, 2], "z": {"p": 1}}, "b": 2}  # inputs untouched


def test_overlay_is_validated_like_a_full_file_with_errors_naming_it(tmp_path, raw_params):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    (tmp_path / "params").mkdir()
    overlay = tmp_path / "params" / "bad.yaml"
    overlay.write_text("overlay_of: ../params.yaml\nevolve: {popsiz: 4, sigma: -1}\n")
    lines = config_error_lines(overlay)
    assert any(line.startswith(f"{overlay}: evolve.popsiz: unknown key") for line in lines)
    assert any(line.startswith(f"{overlay}: evolve.sigma = -1:") for line in lines)
    overlay.write_text("overlay_of: ../nowhere.yaml\nseed: 3\n")
    assert config_error_lines(overlay) == [f"{(tmp_path / 'nowhere.yaml').resolve()}: file not found"]


def test_an_overlay_is_not_stacked_on_another_profile(tmp_path):
    from pipeline.profiles import apply_profile

    shutil.copytree(PROJECT / "params", tmp_path / "params")
    shutil.copyfile(PROJECT / "params.yaml", tmp_path / "params.yaml")
    apply_profile("paper", tmp_path)
    assert load_params(tmp_path / "params.yaml") == load_params(PROJECT / "params" / "paper.yaml")
    lines = config_error_lines(tmp_path / "params" / "learn.yaml")
    assert "holds the 'paper' profile; restore the defaults first (git checkout params.yaml)" in lines[0]
