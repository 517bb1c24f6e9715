"""Every `--conf` key the code reads is in the table `monailabel-dr conf` prints and the README shows, and
every key of the table is read somewhere (issue 19, item 3): checked in both directions over the source."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT
from monailabel_dr.config import CONF_OPTIONS, conf_table_markdown

PACKAGE = ROOT / "monailabel_dr"
# how the code reads a --conf key: conf.get("k"), conf["k"], <settings>.get("k"), _conf_number(conf, "k"), and the
# per-model ones conf.get(f"{name}_k") / conf[f"{row}_k"]
READS = [
    re.compile(r"""\bconf(?:\.get\(|\[)\s*"([a-z_]+)"\s*[,)\]]"""),
    re.compile(r"""\b(?:app_settings|settings|app)\.get\(\s*"([a-z_]+)"\s*[,)]"""),
    re.compile(r"""_conf_number\(\s*conf,\s*"([a-z_]+)\""""),
]
PER_MODEL = re.compile(r"""\bconf(?:\.get\(|\[)\s*f"\{[a-z_]+\}_([a-z_]+)"\s*[,)\]]""")


def _sources():
    return {p: p.read_text() for p in PACKAGE.rglob("*.py")}


def test_every_key_read_is_in_the_table():
    read, per_model = set(), set()
    for path, text in _sources().items():
        for rx in READS:
            read |= set(rx.findall(text))
        per_model |= set(PER_MODEL.findall(text))
    assert read, "the scan found no --conf reads: the patterns no longer match the code"
    per_model_keys = [k.split("_", 1)[1] for k in CONF_OPTIONS if k.startswith("<model>_")]
    missing = sorted(k for k in read if k not in CONF_OPTIONS and not any(k.endswith(f"_{s}") for s in per_model_keys))
    assert not missing, f"--conf keys read but not in config.CONF_OPTIONS: {missing}"
    missing = sorted(k for k in per_model if f"<model>_{k}" not in CONF_OPTIONS)
    assert not missing, f"per-model --conf keys read but not in config.CONF_OPTIONS: {missing}"


def test_every_key_in_the_table_is_read():
    text = "\n".join(t for p, t in _sources().items())
    unread = []
    for key in CONF_OPTIONS:
        literal = f'_{key.split("_", 1)[1]}"' if key.startswith("<model>_") else f'"{key}"'
        # the table itself is one occurrence of each plain key; a read is another
        if text.count(literal) < (1 if key.startswith("<model>_") else 2):
            unread.append(key)
    assert not unread, f"keys documented in CONF_OPTIONS that no code reads: {unread}"


def test_the_readme_shows_the_table_and_undocumented_reads_fail(tmp_path):
    assert conf_table_markdown() in (ROOT / "README.md").read_text(), \
        "README's --conf table differs from `monailabel-dr conf`: paste its output into the README"
    from monailabel_dr.config import parse_conf

    settings = parse_conf({"models": "grading"}, str(tmp_path))
    assert settings.get("cam_threshold", 0.65) == 0.65
    with pytest.raises(KeyError, match="not documented"):
        settings.get("no_such_key")


@pytest.mark.parametrize("model,override", [
    ("grading", "network.chanels=[8,16,32]"),
    ("lesion_seg", "network.widht=[8,16]"),
    ("lesion_sam", "network.sam.img_sise=256"),
    ("twlr", "network.clip.image_sise=64"),
])
def test_a_typo_in_a_network_block_is_refused(tmp_path, model, override):
    """A misspelt network key stops the app with an error naming it and the accepted keys, instead of
    building the default network (issue 19, item 3)."""
    from monailabel_dr.cli import make_app

    store = tmp_path / "store"
    store.mkdir()
    conf = {"models": model, "profile": "tiny", "model_dir": str(tmp_path / "m"), "device": "cpu",
            f"{model}_set": override, "infer_workers": "0", "rescore_interval": "0"}
    bad_key = override.split("=")[0].rsplit(".", 1)[1]
    with pytest.raises(Exception, match=rf"unknown key\(s\) \['{bad_key}'\]; accepted"):
        make_app(str(store), conf)
