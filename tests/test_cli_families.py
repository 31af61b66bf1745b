"""Families from anywhere in the `metaopt` command: a registered name, `package.module:Class` or
`path/to/file.py:Class` in `metaopt run`, `describe`, `report`, `check`; what a run directory
records of the file (its absolute path, its SHA-256) and `--resume` refusing a changed file;
errors that name the spec and the fix; the job's betas reaching a family only through a `betas`
option. About 15 s on 2 CPU cores, most of it one tiny run."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import matplotlib
import pytest
import torch
import yaml

matplotlib.use("Agg")

import metaopt  # noqa: E402
import metaopt.check as checks  # noqa: E402
import metaopt.jobs.train as train  # noqa: E402
from metaopt.check import CheckResult, FamilyReport  # noqa: E402
from metaopt.jobs.config import build_config, read_config_file  # noqa: E402
from metaopt.registry import FamilySpecError, load_family_spec  # noqa: E402
from test_cli import invoke, only_run_dir, records  # noqa: E402 - the same CLI helpers

FAMILIES = '''\
"""Families of a user's own, in a file of their own."""
import torch
from pydantic import Field

from metaopt import Coefficient, CoefficientSpace, Family, Hyperparameters


class Momentum(Family):
    """SGD with a learned momentum mu."""

    name = "momentum"
    elementwise = True
    points = {"still": {"mu": 0.0}}

    def __init__(self, mu=0.5):
        self.space = CoefficientSpace(mu=Coefficient(init=mu, low=0.0, high=0.99))

    def init(self, param, grad, group):
        return {"buf": torch.zeros_like(param)}

    def update(self, grad, param, state, coefficients, group, step):
        buf = coefficients["mu"] * state["buf"] + grad
        return -group["lr"] * buf, {"buf": buf}


class Heavy(Momentum):
    """Heavy ball whose momentum starts at beta1: a plain constructor with a `betas` parameter."""

    def __init__(self, betas=(0.5, 0.5)):
        self.betas = tuple(betas)
        self.space = CoefficientSpace(mu=Coefficient(init=self.betas[0], low=0.0, high=0.99))


class BetasHyperparameters(Hyperparameters):
    """A per-group `betas` setting, which is not an option of the family."""

    betas: tuple[float, float] = Field((0.5, 0.6))


class GroupBetas(Momentum):
    """Momentum with a fixed per-group damping betas[0]: betas as a hyperparameter only."""

    hyperparameters = BetasHyperparameters

    def update(self, grad, param, state, coefficients, group, step):
        buf = coefficients["mu"] * state["buf"] + group["betas"][0] * grad
        return -group["lr"] * buf, {"buf": buf}


class NotAFamily:
    pass


def make_momentum(**options):
    return Momentum(**options)


def make_nothing(**options):
    return 42


NOT_A_FAMILY = 3
'''

TINY = """\
model: {n_layer: 1, n_head: 2, n_embd: 16, block_size: 16}
steps: 6
batch_size: 4
eval_interval: 3
eval_batches: 2
log_interval: 3
checkpoint_every: 3
device: cpu
"""


@pytest.fixture
def fam(tmp_path) -> Path:
    path = tmp_path / "fams" / "my_family.py"
    path.parent.mkdir()
    path.write_text(FAMILIES)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- run, report, resume with a family in a file -----------------------------------------------------


def test_a_family_in_a_file_runs_reports_and_resumes_from_anywhere(fam, tmp_path, monkeypatch):
    """A config names a family file relative to itself; run from another directory, the run
    directory's config.yaml holds the file's absolute path (reported and resumed from a third
    directory), families.json its SHA-256; once the file changes, --resume refuses, naming it."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "job.yaml").write_text(TINY + "optimizers:\n  - {name: adam, kind: adam}\n"
                                      "  - {kind: ../fams/my_family.py:Momentum}\n  - {name: hd, kind: sgd_hd}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("run", "../configs/job.yaml", "--out", "runs", "--no-progress")
    assert result.exit_code == 0, result.output
    run_dir = only_run_dir(elsewhere / "runs").resolve()

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    contender = saved["optimizers"][1]
    assert contender["kind"] == f"{fam}:Momentum" and Path(contender["kind"].rsplit(":", 1)[0]).is_absolute()
    assert contender["name"] == "Momentum"  # the class names a contender that sets no name
    recorded = json.loads((run_dir / "families.json").read_text())["families"]["Momentum"]
    assert recorded["origin"] == "file" and recorded["path"] == str(fam) and recorded["sha256"] == sha256(fam)
    mine = [r for r in records(run_dir) if r["optimizer"] == "Momentum"]
    assert [r["step"] for r in mine] == list(range(7))
    assert all(set(r["coefficients"]) == {"mu"} for r in mine)
    assert all(set(r["hypergrad"]) == {"mu"} for r in mine[1:]) and any(r["hypergrad"]["mu"] > 0 for r in mine[1:])
    # the job's betas do not reach it (no `betas` option): said once, before training
    assert result.stderr.count("note: optimizer 'Momentum'") == 1
    assert result.stderr.index("note: optimizer 'Momentum'") < result.stderr.index("seed 0 adam step 3/6")

    third = tmp_path / "third"
    third.mkdir()
    monkeypatch.chdir(third)
    result = invoke("report", str(run_dir))
    assert result.exit_code == 0, result.output
    assert "| Momentum" in result.stdout
    result = invoke("run", "--resume", str(run_dir), "--no-progress")  # finished: nothing to do, accepted
    assert result.exit_code == 0, result.output
    assert "resume seed 0: adam finished, Momentum finished, hd finished" in result.stderr
    assert "note: the family" not in result.stderr

    # a registered family's file that changed (an upgrade, an edited install) is reported, not refused
    families = run_dir / "families.json"
    text = families.read_text()
    hd = json.loads(text)["families"]["hd"]
    assert hd["origin"] == "entry point" and hd["path"] == str(Path(metaopt.registry.load_family_spec("sgd_hd").path))
    families.write_text(text.replace(hd["sha256"], "0" * 64))
    result = invoke("run", "--resume", str(run_dir), "--no-progress")
    assert result.exit_code == 0, result.output
    assert (f"note: the family of optimizer 'hd' (entry point sgd_hd = metaopt.plugins.hd:SGDHD): {hd['path']} changed "
            f"since the run started (sha256 {'0' * 16} then, {hd['sha256'][:16]} now)") in result.stderr
    families.write_text(text)

    fam.write_text(FAMILIES.replace("buf = coefficients[\"mu\"] * state", "buf = 0.9 * coefficients[\"mu\"] * state", 1))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = invoke("run", "--resume", str(run_dir), "--no-progress")
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert f"error: cannot resume {run_dir}: the family file of optimizer 'Momentum': {fam} changed since the run started" in err
    assert recorded["sha256"][:16] in err and sha256(fam)[:16] in err
    assert "Put the file back" in err and f"metaopt run {run_dir / 'config.yaml'}" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing changed in it


def test_a_family_that_breaks_the_contract_is_refused_before_training(tmp_path, monkeypatch):
    """`metaopt run` makes each contender's optimizer once before any run: the engine's refusal,
    naming the contender and the fix, exit 2, and no run directory."""
    (tmp_path / "broken.py").write_text(
        "import torch\nfrom metaopt import Coefficient, CoefficientSpace, Family\n\n\nclass InPlace(Family):\n"
        "    def __init__(self):\n        self.space = CoefficientSpace(mu=Coefficient(init=0.5, low=0.0, high=0.99))\n\n"
        "    def init(self, param, grad, group):\n        return {'buf': torch.zeros_like(param)}\n\n"
        "    def update(self, grad, param, state, coefficients, group, step):\n"
        "        buf = state['buf'].mul_(coefficients['mu']).add_(grad)\n        return -group['lr'] * buf, {'buf': buf}\n")
    (tmp_path / "job.yaml").write_text(TINY + "optimizers:\n  - {name: adam, kind: adam}\n  - {kind: broken.py:InPlace}\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "job.yaml", "--out", "runs", "--no-progress")
    assert result.exit_code == 2, result.output
    assert "error: cannot set up the job: optimizer 'InPlace'" in result.stderr
    assert "changed its input state['buf'] in place" in result.stderr and "fix: write update with out-of-place ops" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_file_paths_on_the_command_line_are_relative_to_the_current_directory(fam, monkeypatch):
    monkeypatch.chdir(fam.parent)
    result = invoke("run", "--quick", "--dry-run", "--set", "optimizers.1.kind=my_family.py:Momentum",
                    "--set", "optimizers.1.point=still", "--set", "optimizers.1.options={mu: 0.3}")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["optimizers"][1]["kind"] == f"{fam}:Momentum"
    built = build_config(cfg)
    assert built.optimizers[1].family(built.betas).space["mu"].init == 0.0  # the point: still


def test_two_files_with_one_stem_do_not_clash(tmp_path):
    for sub, coefficient in (("a", "mu"), ("b", "nu")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "fam.py").write_text(
            "from metaopt import Coefficient, CoefficientSpace, Family\n\n\nclass Momentum(Family):\n"
            f"    def __init__(self):\n        self.space = CoefficientSpace({coefficient}=Coefficient(init=0.5, low=0.0, high=1.0))\n"
        )
    a, b = (load_family_spec(str(tmp_path / sub / "fam.py") + ":Momentum") for sub in ("a", "b"))
    assert a.factory is not b.factory and a.factory.__module__ != b.factory.__module__
    assert a.factory().space.names == ("mu",) and b.factory().space.names == ("nu",)
    assert sys.modules[a.factory.__module__].__file__ == str(tmp_path / "a" / "fam.py")
    # the same file is the same module: loading it again runs nothing again
    assert load_family_spec(str(tmp_path / "a" / "fam.py") + ":Momentum").factory is a.factory
    cfg = build_config({"optimizers": [{"name": "a", "kind": f"{tmp_path}/a/fam.py:Momentum"},
                                       {"name": "b", "kind": f"{tmp_path}/b/fam.py:Momentum"}]})
    assert [o.learned() for o in cfg.optimizers] == [("mu",), ("nu",)]


def test_a_family_by_module_and_class(tmp_path):
    result = invoke("run", "--quick", "--dry-run", "--set",
                    "optimizers=[{name: adam, kind: adam}, {kind: 'metaopt.plugins.mada:MADA', point: adam}]")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.stdout)
    assert cfg["optimizers"][1]["kind"] == "metaopt.plugins.mada:MADA" and cfg["optimizers"][1]["name"] == "MADA@adam"
    result = invoke("describe", "metaopt.plugins.mada:MADA")
    assert result.exit_code == 0, result.output
    assert "module metaopt.plugins.mada:MADA" in result.stdout and "beta3" in result.stdout


# -- errors ------------------------------------------------------------------------------------------


BROKEN = "import torch\n\nx = 1 / 0  # oops\n"


@pytest.mark.parametrize(("spec", "words"), [
    ("fams/nowhere.py:Momentum", ["not found", "nowhere.py", "does not exist", "relative to"]),
    ("fams/my_family.py:Momentm", ["has no 'Momentm'", "did you mean 'Momentum'", "Momentum, Heavy, GroupBetas"]),
    ("fams/my_family.py:NotAFamily", ["NotAFamily is a class but not a metaopt.Family subclass", "class NotAFamily(metaopt.Family)"]),
    ("fams/my_family.py:NOT_A_FAMILY", ["NOT_A_FAMILY is a int", "name the class"]),
    ("fams/my_family.py:make_nothing", ["make_nothing(...) returned int", "not a metaopt.Family"]),
    ("fams/broken.py:Momentum", ["raised on import", "ZeroDivisionError: division by zero", "broken.py:3: x = 1 / 0", "fix the file"]),
    ("fams/syntax.py:Momentum", ["raised on import", "SyntaxError", "syntax.py:2"]),
    ("no_such_package_xyz.families:Momentum", ["no module named 'no_such_package_xyz.families'", "install the package"]),
    ("nosuch", ["no family registered as 'nosuch'", "mada", "path/to/file.py:Class"]),
])
def test_a_bad_spec_names_the_spec_and_the_fix(fam, tmp_path, monkeypatch, spec, words):
    (fam.parent / "broken.py").write_text(BROKEN)
    (fam.parent / "syntax.py").write_text("import torch\ndef f(:\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("describe", spec)
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.stderr, (w, result.stderr)
    assert "Traceback" not in result.output
    # the same error from a config, under the contender's kind; nothing is trained
    config = tmp_path / "bad.yaml"
    config.write_text(f"optimizers:\n  - {{name: x, kind: '{spec}'}}\n")
    result = invoke("run", str(config), "--out", str(tmp_path / "runs"))
    assert result.exit_code == 2, result.output
    assert "  optimizers.0.kind (optimizer 'x'): " in result.stderr
    assert (words[0] if ":" in spec else "unknown optimizer kind 'nosuch'") in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_spec_is_relative_to_the_base_directory(fam):
    with pytest.raises(FamilySpecError, match="relative to"):
        load_family_spec("my_family.py:Momentum")  # from the current directory: not there
    source = load_family_spec("my_family.py:Momentum", base_dir=fam.parent)
    assert source.origin == "file" and source.path == fam and source.target == f"{fam}:Momentum"
    assert source.sha256 == sha256(fam)


# -- describe ------------------------------------------------------------------------------------------


def test_describe_a_family_in_a_file(fam, monkeypatch):
    monkeypatch.chdir(fam.parent.parent)
    result = invoke("describe", "fams/my_family.py:Momentum", "-o", "mu=0.3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("fams/my_family.py:Momentum — SGD with a learned momentum mu.")
    assert f"file {fam}:Momentum, sha256 {sha256(fam)[:16]}" in out
    assert "\n  mu " in out and "0.3" in out and "still" in out
    assert "Default hyper-optimizer" in out
    info = json.loads(invoke("describe", "fams/my_family.py:Momentum", "--json").stdout)
    assert info["source"]["sha256"] == sha256(fam) and info["source"]["origin"] == "file"
    default = metaopt.Family.default_hypergrad(load_family_spec(str(fam) + ":Momentum").factory())
    assert info["default_hypergrad"] == {"mode": type(default).__name__, **json.loads(default.model_dump_json())}
    mada = json.loads(invoke("describe", "mada", "--json").stdout)
    from metaopt.plugins.mada import MADA

    assert mada["default_hypergrad"]["warmup"] == MADA().default_hypergrad().warmup == 50
    assert mada["entry_point"] == "metaopt.plugins.mada:MADA"


# -- betas -----------------------------------------------------------------------------------------------


def test_the_jobs_betas_reach_a_family_only_through_a_betas_option(fam, tmp_path):
    """A constructor parameter (or options field) named betas gets the job's; a family whose
    hyperparameters merely have a `betas` field keeps its own values, and `metaopt run` says so,
    once per contender, before training."""
    path = tmp_path / "job.yaml"
    path.write_text(TINY + "betas: [0.8, 0.95]\nseeds: 2\noptimizers:\n  - {name: adam, kind: adam}\n"
                    f"  - {{name: heavy, kind: '{fam}:Heavy'}}\n  - {{name: group, kind: '{fam}:GroupBetas'}}\n"
                    f"  - {{name: own, kind: '{fam}:GroupBetas', hyperparameters: {{betas: [0.3, 0.4]}}}}\n"
                    "  - {name: mada, kind: mada}\n")
    cfg = build_config(read_config_file(path))
    model = torch.nn.Linear(3, 2)
    heavy, group, own, mada = (train.build_optimizer(o, cfg, model) for o in cfg.optimizers[1:])
    assert heavy.family.betas == (0.8, 0.95) and float(heavy.coefficients["mu"]) == pytest.approx(0.8)
    assert group.param_groups[0]["betas"] == (0.5, 0.6)  # its own default, not the job's
    assert own.param_groups[0]["betas"] == (0.3, 0.4)
    assert mada.family.options.betas == (0.8, 0.95)

    result = invoke("run", str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("note:")]
    assert notes == [
        f"note: optimizer 'group' (kind {fam}:GroupBetas) ignores the job's betas (0.8, 0.95): the family has no "
        "`betas` option; its own values apply (set them in `options:` or `hyperparameters:`)"
    ]


# -- check -------------------------------------------------------------------------------------------------


RESULTS = [
    CheckResult("contract", "pass", "init and update keep the contract"),
    CheckResult("hypergradient vs finite differences", "pass", "max rel err 3e-07"),
    CheckResult("compiled path", "skip", "no compiler"),
]
FAILURE = CheckResult("zero gradient", "fail", "delta is NaN where g = 0", "guard the division: v + eps")


@pytest.fixture
def fake_check(monkeypatch):
    """``check_family`` replaced by one that reports ``results`` (set by the test) through the
    progress callback, one by one, and records how it was called."""
    calls: list[dict] = []
    state = {"results": list(RESULTS)}

    def check_family(family, *, paths=None, compile=True, seed=0, progress=None, **hyperparameters):
        calls.append({"family": family, "compile": compile})
        report = FamilyReport(family.name)
        for r in state["results"]:
            report.checks.append(r)
            if progress is not None:
                progress(r)
        return report

    monkeypatch.setattr(checks, "check_family", check_family)
    return calls, state


def test_check_prints_each_result_then_the_summary(fam, fake_check):
    calls, _ = fake_check
    result = invoke("check", f"{fam}:Momentum", "-o", "mu=0.25")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 and calls[0]["compile"] is True
    family = calls[0]["family"]
    assert isinstance(family, metaopt.Family) and float(family.space["mu"].init) == 0.25
    report = FamilyReport("momentum", list(RESULTS))
    assert result.stdout.splitlines() == [*(str(r) for r in RESULTS), str(report).splitlines()[-1]]
    assert result.stdout.splitlines()[-1] == "momentum: 2 passed, 0 failed, 1 skipped"
    assert invoke("check", "mada", "--no-compile").exit_code == 0
    assert calls[-1]["compile"] is False


def test_check_exits_1_on_a_failure_with_its_fix(fake_check):
    _, state = fake_check
    state["results"] = [RESULTS[0], FAILURE]
    result = invoke("check", "mada")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[1] == "FAIL  zero gradient: delta is NaN where g = 0" and lines[2] == "      fix: guard the division: v + eps"
    assert lines[-1] == "mada: 1 passed, 1 failed"


def test_check_json_prints_the_report(fake_check):
    _, state = fake_check
    state["results"] = [RESULTS[0], FAILURE]
    result = invoke("check", "mada", "--json")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout) == FamilyReport("mada", [RESULTS[0], FAILURE]).to_dict()
    assert str(RESULTS[0]) in result.stderr  # progress still shown, apart from the JSON


def test_check_exits_2_for_a_bad_spec_or_options(fam, fake_check):
    calls, _ = fake_check
    for args, words in ((["nosuch"], "no family registered as 'nosuch'"),
                        ([f"{fam}:Nope"], "has no 'Nope'"),
                        (["mada", "-o", "bogus=1"], "bogus"),
                        ([f"{fam}:Momentum", "-o", "nu=1"], "nu"),
                        (["mada", "-o", "lion"], "NAME=VALUE")):
        result = invoke("check", *args)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.stderr, (args, result.stderr)
    assert calls == []


def test_check_runs_the_real_check_family_on_a_family_in_a_file(fam):
    """The command on `metaopt.check.check_family` itself (no fake): a correct family passes."""
    result = invoke("check", f"{fam}:Momentum", "--no-compile")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("momentum: ") and " 0 failed" in result.stdout
