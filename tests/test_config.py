"""Strict configuration: every bad key, type, range and combination names the option."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from mergewatch import config
from mergewatch.errors import ConfigError
from mergewatch.strategies import build_strategy

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))
BASE = 'workspace = "ws"\nbase = "b.safetensors"\n'


def parse(text: str):
    return config.parse(tomllib.loads(BASE + text), source=Path("/tmp/x/mw.toml"))


def test_defaults():
    s = parse("")
    assert (s.policy.init, s.policy.deploy, s.policy.technique) == ("zs", "ema", "wa")
    assert s.publish.keep == 5 and s.metrics.listen == "127.0.0.1:9464" and s.seed == 0
    assert s.publish.shard_bytes is None  # published files follow the base's layout
    assert parse("[publish]\nshard_bytes = 0").publish.shard_bytes == 0
    assert s.workspace == Path("/tmp/x/ws")  # relative to the config file


@pytest.mark.parametrize(
    "text,key",
    [
        ("wrkspace = 1", "wrkspace"),
        ("[publish]\nkepp = 3", "publish.kepp"),
        ("[publish]\nkeep = '3'", "publish.keep"),
        ("[publish]\nkeep = 0", "publish.keep"),
        ("[publish]\nshard_bytes = -1", "publish.shard_bytes"),
        ("[publish]\nshard_bytes = '2GB'", "publish.shard_bytes"),
        ("[watch]\npolling = 1", "watch.polling"),
        ("[metrics]\nlisten = 'nowhere'", "metrics.listen"),
        ("seed = 1.5", "seed"),
        ("[policy]\ninit = 'zero'", "policy.init"),
        ("[policy]\ndeploy = 'best'", "policy.deploy"),
        ("[policy]\ninit = 'zs'\ndeploy = 'ft'", "policy.deploy"),
        ("[policy]\ntechnique = 'tiez'", "policy.technique"),
        ("[policy]\nw = 1.5", "policy.w"),
        ("[policy]\nw = 'half'", "policy.w"),
        ("[policy]\nlambda = -1", "policy.lambda"),
        ("[policy]\nema_seed = 'last'", "policy.ema_seed"),
        ("[policy]\ndeploy = 'all'\ntechnique = 'ties'\n[policy.ties]\np = 1.5", "policy.ties.p"),
        ("[policy]\ndeploy = 'all'\ntechnique = 'ties'\n[policy.ties]\ntrim = 'layer'", "policy.ties.trim"),
        ("[policy]\ndeploy = 'all'\ntechnique = 'ties'\np = 2.0", "policy.ties.p"),
        ("[policy]\ndeploy = 'all'\ntechnique = 'ties'\n[policy.ties]\nq = 1", "policy.ties.q"),
        ("[policy]\ndeploy = 'all'\ntechnique = 'wa'\n[policy.lines]\nalpha = 0.5", "policy.lines"),
        ("[policy]\ndeploy = 'ema'\ntechnique = 'ta'\n[policy.weaving]\npool = 'avg'", "policy.weaving"),
        ("[policy]\ndeploy = 'all'\ntechnique = 'ta'\n[policy.weaving]\npool = 'max'", "policy.weaving.pool"),
        ("[policy]\ndeploy = 'all'\ntechnique = 'ta'\n[policy.lines]\nvariant = 'cubic'", "policy.lines.variant"),
        ("[policy]\ndeploy = 'all'\nweights = 'fibonacci'", "policy.weights"),
        ("[policy]\ndeploy = 'all'\ntechnique = 'ta'\nweights = 'linear'", "policy.weights"),
        ("[policy]\ndeploy = 'all'\ninit = 'zs'\nw = 0.5", "policy.w"),
        ("[policy]\nfoo = 1", "policy.foo"),
        ("[policy.nonsense]\nx = 1", "policy.nonsense"),
        ("[model]\ndtype_policy = 'loose'", "model.dtype_policy"),
        ("[model]\narchitecture = 'resnet'", "model.architecture"),
        ("[model]\nroles = [{pattern = 'x', role = 'linearish'}]", "model.roles[0]"),
        ("[policy]\ndeploy = 'slerp'", "policy.deploy"),
    ],
)
def test_bad_values_name_the_key(text, key):
    with pytest.raises(ConfigError) as ei:
        parse(text)
    assert ei.value.key == key, str(ei.value)
    assert key in str(ei.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="'base'"):
        config.parse({"workspace": "x"})


def test_invalid_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[policy\ninit=", "utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(p)


def test_technique_params_in_either_place_are_the_same():
    a = parse("[policy]\ndeploy = 'all'\ntechnique = 'ties'\np = 0.7")
    b = parse("[policy]\ndeploy = 'all'\ntechnique = 'ties'\n[policy.ties]\np = 0.7")
    assert a.policy.technique_params == b.policy.technique_params == {"p": 0.7}


def test_every_valid_time_pair_loads():
    from mergewatch.strategies.time_policy import DEPLOYS, INITS, valid_combination

    n = 0
    for i in INITS:
        for d in DEPLOYS:
            if valid_combination(i, d):
                s = parse(f"[policy]\ninit = '{i}'\ndeploy = '{d}'")
                assert build_strategy(s.policy).describe()["init"] == i
                n += 1
    assert n == 11


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load_and_build(path):
    s = config.load(path)
    strategy = build_strategy(s.policy)
    assert strategy.describe()["name"]
    assert re.match(r"^[a-z_]+$", s.policy.deploy)


def test_examples_exist():
    assert len(EXAMPLES) >= 4


def test_metamerge_checkpoint_path_is_relative_to_the_config(tmp_path):
    import shutil

    nino = Path(__file__).resolve().parents[1].parent / "shared" / "nino" / "checkpoints" / "nino_mlp.pt"
    if not nino.is_file():
        pytest.skip(f"{nino} absent: ../shared/nino/ is not beside this checkout")
    (tmp_path / "cfg").mkdir()
    shutil.copy(nino, tmp_path / "cfg" / "nino_mlp.pt")
    cfg = tmp_path / "cfg" / "mw.toml"
    cfg.write_text(BASE + "[policy]\ndeploy = 'metamerge'\n[policy.metamerge]\ncheckpoint = 'nino_mlp.pt'\n", "utf-8")
    s = config.load(cfg)
    assert s.policy.params["checkpoint"] == str(tmp_path / "cfg" / "nino_mlp.pt")
    assert build_strategy(s.policy).describe()["checkpoint_sha256"].startswith("34d9ff37")
