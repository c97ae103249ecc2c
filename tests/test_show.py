"""`show` and the reader against what torch itself loads from the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ckpttool
from ckpttool.cli import cli
from ckpttool.render import show_json
from conftest import FIXTURES
from torch_json import expected, load_fixture, module_state_dict, strip_device

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
READABLE = [f for f in MANIFEST if f["kind"] != "unsafe"]


def torch_load(path: Path) -> Any:
    # our own fixtures, made by fixtures/make_fixtures.py: trusted, so a full load is fine here
    return load_fixture(path, map_location="cpu")


FRAMEWORK_SCHEDULERS = ("mmengine", "deepspeed")  # kinds whose schedulers are not torch's


def scheduler_type(fixture: dict[str, Any], cls: str) -> str:
    """What ckpttool reports for a scheduler the manifest names by class: its torch class,
    or "unknown" for a framework's own scheduler (mmengine LinearLR, DeepSpeed WarmupLR)."""
    return "unknown" if fixture["kind"] in FRAMEWORK_SCHEDULERS else cls


def torch_tree(fixture: dict[str, Any]) -> Any:
    path = FIXTURES / fixture["path"]
    if path.is_dir():
        # the optimizer / scheduler files (RNG state and TrainingArguments need other packages)
        wanted = {p["pointer"].split("/")[1] for p in fixture["optimizers"] + fixture["schedulers"]}
        return {n: torch_load(path / n) for n in wanted}
    return torch_load(path)


def at(tree: Any, pointer: str) -> Any:
    for tok in pointer.split("/")[1:]:
        tree = tree[int(tok)] if isinstance(tree, list) else tree[tok]
    return tree


@pytest.mark.parametrize("fixture", READABLE, ids=lambda f: f["path"])
def test_show_json_matches_torch(fixture: dict[str, Any]) -> None:
    path = FIXTURES / fixture["path"]
    doc = show_json(ckpttool.open(path))
    tree = torch_tree(fixture)
    cuda = fixture["path"] == "cuda0.pt" or fixture.get("location", "cpu") != "cpu"
    norm = strip_device if cuda else (lambda x: x)

    assert [(o["pointer"], o["type"]) for o in doc["optimizers"]] == \
        [(o["pointer"], o["class"]) for o in fixture["optimizers"]]
    assert [(s["pointer"], s["type"]) for s in doc["schedulers"]] == \
        [(s["pointer"], scheduler_type(fixture, s["class"])) for s in fixture["schedulers"]]
    assert [m["pointer"] for m in doc["models"]] == [m["pointer"] for m in fixture["models"]]

    for opt in doc["optimizers"]:
        sd = at(tree, opt["pointer"])
        assert len(opt["param_groups"]) == len(sd["param_groups"])
        for ours, theirs in zip(opt["param_groups"], sd["param_groups"]):
            assert ours["params"] == theirs["params"]
            hp = {k: v for k, v in theirs.items() if k not in ("params", "param_names")}
            assert ours["hyperparameters"] == expected(hp)
            assert list(ours["hyperparameters"]) == list(hp)  # key order kept
            if "param_names" in theirs:
                assert ours["param_names"] == theirs["param_names"]
        assert [s["param"] for s in opt["state"]] == list(sd["state"])
        for s in opt["state"]:
            assert norm(s["entries"]) == norm(expected(sd["state"][s["param"]]))
    for sch in doc["schedulers"]:
        assert sch["state"] == expected(at(tree, sch["pointer"]))
    for m in doc["models"]:
        if m["pointer"].endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(str(path / m["pointer"][1:]))
        else:
            sd = at(tree, m["pointer"])
            if m["pointer"] in fixture.get("pickled_modules", ()):
                sd = module_state_dict(sd)
        assert m["tensors"] == len(sd)
        assert m["elements"] == sum(t.numel() for t in sd.values())
        assert m["bytes"] == sum(t.numel() * t.element_size() for t in sd.values())


def test_cuda_tags_are_reported_per_storage() -> None:
    doc = show_json(ckpttool.open(FIXTURES / "cuda0.pt"))
    devices = {(k, e["device"]) for s in doc["optimizers"][0]["state"]
               for k, e in s["entries"].items()}
    assert devices == {("step", "cpu"), ("exp_avg", "cuda:0"), ("exp_avg_sq", "cuda:0")}


def test_step_values_and_lbfgs_python_values() -> None:
    doc = show_json(ckpttool.open(FIXTURES / "optim_adam.pt"))
    assert [s["entries"]["step"]["value"] for s in doc["optimizers"][0]["state"]] == [3.0] * 4
    lb = show_json(ckpttool.open(FIXTURES / "optim_lbfgs.pt"))["optimizers"][0]["state"][0]
    sd = torch.load(FIXTURES / "optim_lbfgs.pt")["state"][0]
    assert lb["entries"]["n_iter"] == sd["n_iter"]
    assert lb["entries"]["func_evals"] == sd["func_evals"]


def test_unsafe_fixture_is_described_without_running(tmp_path: Path) -> None:
    marker = Path("/tmp/ckpttool_pwned_marker")
    marker.unlink(missing_ok=True)
    ckpt = ckpttool.open(FIXTURES / "unsafe_os_system.pt")
    doc = show_json(ckpt)
    assert doc["unsafe"] is True
    assert doc["unsafe_globals"] == ["posix.system"]
    assert doc["top_level"]["payload"] == "posix.system (UNSAFE: runs code on load)"
    assert doc["optimizers"][0]["type"] == "SGD"
    result = CliRunner().invoke(cli, ["show", str(FIXTURES / "unsafe_exec.pt")])
    assert result.exit_code == 0
    assert result.output.splitlines()[3:5] == [
        "safety:  UNSAFE: loading it would run __builtin__.exec at /payload: a builtin that "
        "runs or reaches code. Do not torch.load it with weights_only=False; ckpttool will not "
        "write from it",
        "  unsafe: __builtin__.exec(\"open('/tmp/ckpttool_pwned_marker_exec...\") at /payload: "
        "a builtin that runs or reaches code"]
    assert not marker.exists()


def test_opaque_objects_are_kept_as_data() -> None:
    doc = show_json(ckpttool.open(FIXTURES / "opaque.pt"))
    assert doc["unsafe"] is False
    assert doc["opaque_globals"] == ["argparse.Namespace", "numpy._core.multiarray.scalar",
                                     "numpy.dtype", "pathlib.PosixPath"]
    ckpt = ckpttool.open(FIXTURES / "opaque.pt")
    ns = ckpt.resolve("/args")
    assert ns.qualname == "argparse.Namespace"
    assert ns.state == {"lr": 0.1, "arch": "x"}
    assert ckpt.resolve("/path").args == ("/", "tmp", "x")


def test_legacy_format_reads_like_zip() -> None:
    a = show_json(ckpttool.open(FIXTURES / "imagenet_style.pth"))
    b = show_json(ckpttool.open(FIXTURES / "imagenet_style_legacy.pth"))
    assert b["format"] == "torch-legacy"
    for k in ("optimizers", "schedulers", "models", "top_level"):
        assert a[k] == b[k]


# -------------------------------------------------------------------------- names

def _save(tmp_path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    x = torch.randn(5, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    p = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, p)
    return p


def _names(path: Path) -> tuple[list[list[str | None]], str | None, str | None]:
    opt = ckpttool.open(path).optimizers[0]
    return [g.param_names for g in opt.groups], opt.names_source, opt.names_note


def _true_names(model: torch.nn.Module, groups: list[list[torch.nn.Parameter]]) -> list[list[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [[by_id[id(p)] for p in g] for g in groups]


def test_names_with_groups_out_of_model_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    groups = [list(model[2].parameters()), list(model[0].parameters())]  # [head, backbone]
    opt = torch.optim.Adam([{"params": groups[0]}, {"params": groups[1], "lr": 1e-4}])
    names, source, _ = _names(_save(tmp_path, model, opt))
    assert names == _true_names(model, groups)
    assert source == "model /model (order and shape; 4 of 4 shapes checked)"


def test_names_with_interleaved_decay_groups(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}])
    names, _, note = _names(_save(tmp_path, model, opt))
    # LayerNorm weight and bias and the Linear biases all have shape [4] and sit in the same
    # group, so within-group order decides: still one assignment.
    assert names == _true_names(model, [decay, no_decay]), note


def test_no_names_when_groups_could_be_swapped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = torch.optim.Adam([{"params": model[1].parameters()}, {"params": model[0].parameters()}])
    names, source, note = _names(_save(tmp_path, model, opt))
    assert names == [[None, None], [None, None]]
    assert source is None
    assert note is not None and "more than one assignment" in note


def test_no_names_when_counts_differ(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model[1].parameters())  # only the head is trained
    names, source, note = _names(_save(tmp_path, model, opt))
    assert names == [[None, None]] and source is None
    assert note == ("/model: the optimizer has 2 params but the model has 4 parameter tensors "
                    "(buffers and tied copies excluded)")


def test_names_skip_buffers_and_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.bn = torch.nn.BatchNorm1d(4)
            self.out = torch.nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.bn(self.emb(x)))

    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    p = tmp_path / "ck.pt"
    loss = model(torch.tensor([1, 2, 3])).sum()
    loss.backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, p)
    names, _, note = _names(p)
    assert names == [[n for n, _ in model.named_parameters()]], note


# -------------------------------------------------------------------------- CLI

def test_show_text_output_exact() -> None:
    result = CliRunner().invoke(cli, ["show", str(FIXTURES / "imagenet_style.pth")])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[1] == "format:  torch-zip"
    assert "  epoch       3" in lines
    assert "  best_acc1   tensor float32[] = 42.5" in lines
    assert "optimizer /optimizer: SGD" in lines
    assert ("state: 4 of 4 params have state; names from model /state_dict "
            "(order and shape; 4 of 4 shapes checked)") in lines
    assert "     0  0.weight  [3, 4]   float32  cpu       momentum_buffer" in lines
    assert "scheduler /scheduler: StepLR" in lines
    assert "  last_epoch=3  base_lrs=[0.1]  last_lr=[0.01]" in lines


def test_show_cuts_long_listings(tmp_path: Path) -> None:
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(25)]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sum(p.sum() for p in params).backward()
    opt.step()
    path = tmp_path / "many.pt"
    torch.save(opt.state_dict(), path)
    out = CliRunner().invoke(cli, ["show", str(path)]).output
    assert "  ... 5 more params; use --all to see all" in out
    out_all = CliRunner().invoke(cli, ["show", "--all", str(path)]).output
    assert "more params" not in out_all
    assert "    24" in out_all


def test_show_optimizer_pointer_and_stats() -> None:
    path = str(FIXTURES / "gan.pt")
    doc = json.loads(CliRunner().invoke(cli, ["show", "--json", "--stats", "--optimizer",
                                              "/optimizer_D", path]).output)
    assert [o["pointer"] for o in doc["optimizers"]] == ["/optimizer_D"]
    sd = torch.load(path)["optimizer_D"]["state"]
    for s in doc["optimizers"][0]["state"]:
        t = sd[s["param"]]["exp_avg"].double()
        st = s["entries"]["exp_avg"]["stats"]
        assert st["norm"] == pytest.approx(float(t.norm()), rel=1e-12)
        assert st["min"] == float(t.min()) and st["max"] == float(t.max())
        assert st["mean"] == pytest.approx(float(t.mean()), rel=1e-12)
        assert st["nan"] == 0 and st["inf"] == 0
    bad = CliRunner().invoke(cli, ["show", "--optimizer", "/nope", path])
    assert bad.exit_code == 1
    assert "no optimizer at '/nope'; optimizers are at '/optimizer_G', '/optimizer_D'" in bad.output


def test_show_does_not_import_torch() -> None:
    code = ("import sys\nfrom ckpttool.cli import cli\n"
            "try:\n    cli(['show', '--json', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    for f in ("imagenet_style.pth", "hf_trainer/checkpoint-4", "lightning/epoch=0-step=3.ckpt"):
        r = subprocess.run([sys.executable, "-c", code, str(FIXTURES / f)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_missing_file_is_one_line_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "ckpttool", "show", str(tmp_path / "nope.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 3
    assert r.stderr == f"Error: {tmp_path / 'nope.pt'}: no such file or folder\n"
    assert r.stdout == ""


def test_version() -> None:
    r = CliRunner().invoke(cli, ["--version"])
    assert r.output == f"ckpttool, version {ckpttool.__version__}\n"


@pytest.mark.parametrize("fixture", MANIFEST, ids=lambda f: f["path"])
def test_every_fixture_shows_as_text(fixture: dict[str, Any]) -> None:
    result = CliRunner().invoke(cli, ["show", "--all", str(FIXTURES / fixture["path"])])
    assert result.exit_code == 0, result.output
    for o in fixture["optimizers"]:
        assert f"optimizer {o['pointer'] or '(root)'}: {o['class']}" in result.output
    for s in fixture["schedulers"]:
        assert f"scheduler {s['pointer'] or '(root)'}: " \
            f"{scheduler_type(fixture, s['class'])}" in result.output
    assert ("UNSAFE:" in result.output) == (fixture["kind"] == "unsafe")


def test_any_archive_folder_name(tmp_path: Path) -> None:
    import io
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.5, momentum=0.9)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # a buffer gets the archive folder name "archive"
    path = tmp_path / "renamed_file.pt"
    path.write_bytes(buf.getvalue())
    ckpt = ckpttool.open(path)
    assert ckpt.files[0].archive is not None and ckpt.files[0].archive.prefix == "archive"
    assert ckpt.optimizers[0].groups[0].hyperparameters["lr"] == 0.5


def test_no_names_when_a_group_lists_params_out_of_model_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt = torch.optim.Adam([model[0].bias, model[0].weight])
    names, source, note = _names(_save(tmp_path, model, opt))
    assert names == [[None, None]] and source is None
    assert note == ("/model: no order of the groups fits the model: 0.weight has shape [3, 4] "
                    "where no param of that shape can come next")


def test_render_survives_mutated_fixtures(tmp_path: Path) -> None:
    """Whatever the reader accepts, show renders (text and JSON) or fails with CkptError."""
    import random
    rng = random.Random(7)
    sources = [FIXTURES / n for n in ("imagenet_style.pth", "gan.pt", "optim_adam.pt",
                                      "imagenet_style_legacy.pth", "optim_lbfgs.pt")]
    from ckpttool.render import show_text
    rendered = 0
    for i in range(400):
        data = bytearray(rng.choice(sources).read_bytes())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data) // 2)] = rng.randrange(256)
        path = tmp_path / f"m{i}.pt"
        path.write_bytes(bytes(data))
        try:
            ckpt = ckpttool.open(path)
            show_text(ckpt, show_all=True)
            json.dumps(show_json(ckpt))
            rendered += 1
        except ckpttool.CkptError:
            pass
    assert rendered >= 40, rendered  # the mutations must leave files the renderer sees


def test_progress_line_only_on_a_terminal_after_a_second(capsys: pytest.CaptureFixture[str]) -> None:
    from ckpttool.cli import _Progress
    p = _Progress()
    p.tty = True
    p(50 << 20, 100 << 20)  # within the first second: nothing
    assert capsys.readouterr().err == ""
    p.start -= 2.0
    p(50 << 20, 100 << 20)
    p.close()
    assert capsys.readouterr().err == "\rwriting  50% (50 of 100 MiB)\n"
    q = _Progress()
    q.tty = False
    q.start -= 2.0
    q(1, 2)
    q.close()
    assert capsys.readouterr().err == ""
