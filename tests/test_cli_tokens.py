"""`data: {tokens: DIR, vocab_size: V}`: a corpus in nanoGPT's format (flat uint16 token ids,
train.bin and val.bin), memory-mapped. The reference is the text job: token files holding the
packaged text's character ids, split where the text job splits it, must train to exactly the
text job's numbers. Then the refusals, each naming its field."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from test_cli import invoke, only_run_dir, runner  # noqa: E402 - the same CLI helpers

from metaopt.cli import app  # noqa: E402
from metaopt.jobs.data import CharDataset, TokenDataset  # noqa: E402


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory) -> Path:
    """The packaged text's character ids as nanoGPT's two files, split at the text job's 90%."""
    text = CharDataset.from_source(None, 0.1)
    d = tmp_path_factory.mktemp("tokens")
    text.train.numpy().astype(np.uint16).tofile(d / "train.bin")
    text.val.numpy().astype(np.uint16).tofile(d / "val.bin")
    return d


def test_token_batches_are_the_text_batches(token_dir):
    text, tokens = CharDataset.from_source(None, 0.1), TokenDataset(token_dir, 65)
    for split in ("train", "val"):
        a = text.batch(split, 8, 32, torch.Generator().manual_seed(3))
        b = tokens.batch(split, 8, 32, torch.Generator().manual_seed(3))
        assert all(torch.equal(x, y) and y.dtype == torch.long for x, y in zip(a, b))


def test_a_token_job_trains_as_the_text_job(token_dir, tmp_path):
    args = ("run", "--quick", "--set", "threads=1", "--no-progress")
    assert invoke(*args, "--out", str(tmp_path / "text")).exit_code == 0
    result = invoke(*args, "--out", str(tmp_path / "tokens"), "--set", f"data={{tokens: {token_dir}, vocab_size: 65}}")
    assert result.exit_code == 0, result.output
    text, tokens = only_run_dir(tmp_path / "text"), only_run_dir(tmp_path / "tokens")
    drop = ("time", "train_time")
    recs = [[{k: v for k, v in json.loads(line).items() if k not in drop} for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (text, tokens)]
    assert recs[0] == recs[1]
    import yaml

    saved = yaml.safe_load((tokens / "config.yaml").read_text())["data"]
    assert saved["tokens"] == str(token_dir.resolve()) and saved["vocab_size"] == 65
    assert "tokens" not in yaml.safe_load((text / "config.yaml").read_text())["data"]  # a text job's reads as before


def test_bad_token_data_is_refused_naming_the_field(token_dir, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "train.bin").write_bytes(b"\x01\x00\x02")
    (odd / "val.bin").write_bytes(b"\x01\x00")
    half = tmp_path / "half"
    half.mkdir()
    (half / "train.bin").write_bytes(b"\x01\x00")
    cases = [
        (f"data={{tokens: {tmp_path / 'none'}, vocab_size: 65}}", "data.tokens", "no such directory"),
        (f"data={{tokens: {half}, vocab_size: 65}}", "data.tokens", "has no val.bin"),
        (f"data={{tokens: {odd}, vocab_size: 65}}", "data.tokens", "not a whole number of uint16 token ids"),
        (f"data={{tokens: {token_dir}}}", "data.vocab_size", "token files need their vocabulary size"),
        ("data={vocab_size: 65}", "data.vocab_size", "applies to token files"),
    ]
    for setting, field, message in cases:
        result = runner.invoke(app, ["run", "--quick", "--dry-run", "--set", setting])
        assert result.exit_code == 2 and field in result.output and message in result.output, (setting, result.output)
    # ids beyond the vocabulary: refused when the job loads its data, before a run directory exists
    result = runner.invoke(app, ["run", "--quick", "--out", str(tmp_path / "never"), "--set", f"data={{tokens: {token_dir}, vocab_size: 60}}"])
    assert result.exit_code == 2 and "token id 64, not below the vocabulary size 60 (data.vocab_size)" in result.output, result.output
    assert not (tmp_path / "never").exists()
