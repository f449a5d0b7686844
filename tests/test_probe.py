"""Layer discovery and Probe on several architectures; capture never changes the model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from torch import nn

import plasticity_probe as pp
from plasticity_probe.layers import discover_layers


def mlp(inplace: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 3)
    )


class FunctionalMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Reordered(nn.Module):
    """Registered head, middle, first; runs first, middle, head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.middle = nn.Linear(16, 16)
        self.first = nn.Linear(6, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.middle(torch.relu(self.first(x)))))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 5 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(F.relu(self.norm(self.conv(x)))))


def test_mlp_features_are_post_activation() -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(32, 6)
    with pp.Probe(model).capture() as probe:
        model(x)
    assert [(i.name, i.index, i.kind) for i in probe.layers] == [
        ("0", 1, "linear"),
        ("2", 2, "linear"),
        ("4", 3, "linear"),
    ]
    h1 = torch.relu(model[0](x))
    torch.testing.assert_close(probe.features["0"], h1)
    torch.testing.assert_close(probe.features["2"], torch.relu(model[2](h1)))
    torch.testing.assert_close(probe.features["4"], model(x))


@pytest.mark.parametrize("make", [lambda: mlp(False), lambda: mlp(True), FunctionalMLP, Reordered])
def test_same_report_for_every_way_of_writing_the_mlp(make: type[nn.Module]) -> None:
    torch.manual_seed(0)
    ref, x = mlp(), torch.randn(64, 6)
    torch.manual_seed(0)
    model = make()
    # copy ref's weights into the model in forward order
    with torch.no_grad():
        for src, dst in zip(
            [m for m in ref if isinstance(m, nn.Linear)],
            [i.module for i in discover_layers(model, x)[0]],
            strict=True,
        ):
            dst.load_state_dict(src.state_dict())
    r_ref = pp.Probe(ref, probe_batch=x).measure()
    r = pp.Probe(model, probe_batch=x).measure()
    assert [rec.index for rec in r.layers] == [1, 2, 3]
    for a, b in zip(r_ref.layers, r.layers, strict=True):
        for metric, value in a.metrics.items():
            assert b.metrics[metric] == pytest.approx(value, rel=1e-6), (metric, b.name)


def test_reordered_modules_are_numbered_in_forward_order() -> None:
    layers, _ = discover_layers(Reordered(), torch.randn(2, 6))
    assert [(i.name, i.index) for i in layers] == [("first", 1), ("middle", 2), ("head", 3)]


def test_cnn_channels_and_skipped_modules() -> None:
    torch.manual_seed(0)
    model, x = SmallCNN(), torch.randn(8, 2, 5, 5)
    model.eval()
    with torch.no_grad():
        model.conv.bias.fill_(-100.0)  # every conv output negative: after norm(eval)+relu…
        model.norm.bias.fill_(-100.0)  # …all channels are exactly 0: dead
    report = pp.Probe(model, probe_batch=x).measure()
    assert [r.name for r in report.layers] == ["conv", "fc"]
    assert report["conv"].n_units == 4  # channels, features kept as (N, C, H, W)
    assert report["conv"].metrics["dead_fraction"] == 1.0
    assert report["conv"].metrics["effective_rank"] == 0.0
    skipped = {s.name: s.reason for s in report.skipped}
    assert "not a layer" in skipped["norm"]
    assert "flat" in skipped
    assert report["conv"].params == ["conv.weight", "conv.bias", "norm.weight", "norm.bias"]  # BN applied in its chain
    assert report.groups == []


def test_unused_layer_is_listed_not_dropped() -> None:
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "unused": nn.Linear(3, 3)})
    probe = pp.Probe(model)
    with probe.capture():
        model["a"](torch.randn(2, 3))
    # the root was not called: the pass is the layer call itself
    report = probe.report()
    assert [r.name for r in report.layers] == ["a"]
    assert any(s.name == "unused" and "not called" in s.reason for s in report.skipped)


def test_named_layers_and_chosen_metrics() -> None:
    model = mlp()
    probe = pp.Probe(model, layers=["2"], metrics=["effective_rank", "weight_magnitude"])
    report = probe.measure(torch.randn(10, 6))
    assert [r.name for r in report.layers] == ["2"]
    assert set(report["2"].metrics) == {"effective_rank", "weight_magnitude"}
    with pytest.raises(ValueError, match="unknown layer"):
        pp.Probe(model, layers=["nope"])
    with pytest.raises(ValueError, match="unknown metric"):
        pp.Probe(model, metrics=["nope"])


def test_hooks_removed_on_error_and_mode_unchanged() -> None:
    model = mlp()
    model.eval()
    probe = pp.Probe(model)
    with pytest.raises(RuntimeError, match="boom"), probe.capture():
        model(torch.randn(2, 6))
        raise RuntimeError("boom")
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not model.training


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.booleans())
def test_capture_leaves_outputs_and_gradients_bit_identical(seed: int, inplace: bool, train_mode: bool) -> None:
    torch.manual_seed(seed)
    model, x = mlp(inplace), torch.randn(16, 6)
    model.train(train_mode)
    out_ref = model(x)
    out_ref.square().sum().backward()
    grads_ref = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    with pp.Probe(model).capture():
        out = model(x)
        out.square().sum().backward()
    assert torch.equal(out, out_ref)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_ref, strict=True))  # type: ignore[arg-type]
    assert model.training == train_mode


def test_probe_uses_fixed_batch_and_aggregates() -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(128, 6)
    probe = pp.Probe(model, probe_batch=x)
    r1, r2 = probe.measure(), probe.measure()
    assert r1.rows() == r2.rows()
    feats = probe.features
    hidden_dead = sum(pp.dead_unit_fraction(feats[n]) * 16 for n in ("0", "2")) / 32
    assert r1.network["dead_fraction"] == pytest.approx(hidden_dead)
    assert r1.network["weight_magnitude"] == pytest.approx(pp.weight_magnitude(model))
    with pytest.raises(ValueError, match="no batch"):
        pp.Probe(model).measure()
    with pytest.raises(RuntimeError, match="nothing captured"):
        pp.Probe(model).report()


def test_report_rows_dict_json_and_table() -> None:
    torch.manual_seed(0)
    report = pp.Probe(mlp(), probe_batch=torch.randn(32, 6)).measure()
    rows = report.rows()
    assert {"layer", "index", "metric", "value"} == set(rows[0])
    assert rows[0]["layer"] == "0" and rows[0]["index"] == 1
    net_rows = [r for r in rows if r["layer"] == "network"]
    assert net_rows and all(r["index"] == 0 for r in net_rows)
    assert report.value("2", "srank") == report["2"].metrics["srank"]
    back = pp.Report.from_dict(json.loads(report.to_json()))
    assert back.rows() == rows
    report.layers[0].metrics["effective_rank"] = math.nan
    assert json.loads(report.to_json())["layers"][0]["metrics"]["effective_rank"] is None
    console = Console(width=200, record=True)
    console.print(report.table(title="t"))
    text = console.export_text()
    assert "effective" in text and "rank" in text and "network" in text and "nan" in text
    console = Console(width=200, record=True)
    console.print(report.table(rows="metric"))
    lines = console.export_text().splitlines()
    assert any(line.startswith("│ effective_rank") and "nan" in line for line in lines)
    with pytest.raises(ValueError, match="rows"):
        report.table(rows="nope")


def test_compiled_model_is_probed_eagerly_and_the_regularizer_says_what_it_cannot_do() -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(16, 6)
    compiled = torch.compile(model, backend="eager")
    expected = pp.Probe(model).measure(x)
    measured = pp.Probe(compiled).measure(x)
    probe = pp.Probe(compiled)
    with probe.capture():
        compiled(x)
    captured = probe.report()
    for report in (measured, captured):
        assert [r.name for r in report.layers] == ["0", "2", "4"]
        for r in expected.layers:
            assert report[r.name].metrics == pytest.approx(r.metrics)
    with pytest.raises(ValueError, match="compile"):
        pp.SuccessiveRegularizer(compiled, "singular")
    reg = pp.SuccessiveRegularizer(compiled, "l2", lam=1.0, delta=2.0, example_input=x)
    expected_l2 = sum(2.0**l * sum(float((p.detach() ** 2).sum()) for p in model[i].parameters())
                      for l, i in enumerate((0, 2, 4), start=1))  # fmt: skip
    assert float(reg(0)) == pytest.approx(expected_l2, rel=1e-6)


def test_gradient_metrics_against_autograd_and_no_side_effects() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    probe = pp.Probe(model, probe_batch=x)
    bias0 = model[0].bias.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(0.5)  # moved away from θ_0 by a known amount
        model[0].bias[:3] = -50.0  # three units of layer "0" never fire: zero gradient through them
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    report = probe.measure(loss_fn=lambda: ((model(x) - y) ** 2).mean(), gradients=True)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert torch.equal(rng, torch.get_rng_state()) and model.training

    # independent: a copy, its pre-activations kept by hand, gradients by autograd
    ref = copy.deepcopy(model)
    h1 = ref[0](x)
    h2 = ref[2](torch.relu(h1))
    out = ref[5](torch.relu(ref[3](h2)))
    h3 = out
    loss = ((out - y) ** 2).mean()
    grads = torch.autograd.grad(loss, [*ref.parameters(), h1, h2, h3])
    g = dict(zip([n for n, _ in ref.named_parameters()], grads[:8], strict=True))
    pre = {"0": grads[8], "2": grads[9], "5": grads[10]}
    own = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias", "3.weight", "3.bias"], "5": ["5.weight", "5.bias"]}
    for layer, names in own.items():
        norm = math.sqrt(sum(float((g[n].double() ** 2).sum()) for n in names))
        weight = math.sqrt(sum(float((dict(ref.named_parameters())[n].double() ** 2).sum()) for n in names))
        assert report[layer].metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert report[layer].metrics["grad_to_weight_ratio"] == pytest.approx(norm / weight, rel=1e-5)
        score = pre[layer].abs().mean(0) / pre[layer].abs().mean()
        assert report[layer].metrics["grad_dormant_fraction"] == pytest.approx(float((score <= 0.01).double().mean()))
    assert report["0"].metrics["grad_dormant_fraction"] >= 3 / 8
    moved = 0.5**2 * 32 + float(((model[0].bias.detach() - bias0) ** 2).sum())
    assert report["0"].metrics["distance_from_init"] == pytest.approx(math.sqrt(moved), rel=1e-6)
    assert report["2"].metrics["distance_from_init"] == 0.0 == report["5"].metrics["distance_from_init"]


def test_trainability_in_the_report_and_init_state() -> None:
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(64, 6)
    init = {k: v.clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        model[4].weight.mul_(2.0)
    probe = pp.Probe(model, probe_batch=x, init_state=init)
    report = probe.measure(trainability=True, trainability_kwargs={"steps": 20})
    assert report["4"].metrics["distance_from_init"] == pytest.approx(float(init["4.weight"].norm()), rel=1e-6)
    direct = pp.trainability(model, x, steps=20)
    assert report.network["trainability_ratio"] == pytest.approx(direct.ratio)
    with pytest.raises(ValueError, match="loss_fn"):
        pp.Probe(model, probe_batch=x).measure(gradients=True)


class KeepsHidden(nn.Module):
    """Keeps a reference to (or a view of) its hidden features, which the caller later changes."""

    def __init__(self, keep: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.keep = nn.Linear(3, 5), nn.Linear(5, 2), keep
        self.kept: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        self.kept = h if self.keep == "reference" else h.view(-1)
        return self.fc2(h)


@pytest.mark.parametrize("keep", ["reference", "view"])
def test_features_are_copies_when_anyone_else_can_reach_them(keep: str) -> None:
    torch.manual_seed(0)
    model, x = KeepsHidden(keep), torch.randn(8, 3)
    probe = pp.Probe(model)
    with probe.capture(), torch.no_grad():  # no graph: only the references decide whether to copy
        out = model(x)
    expected = torch.relu(model.fc1(x)).detach()
    assert model.kept is not None
    with torch.no_grad():
        model.kept.add_(100.0)  # after the block: the captured features must not move
        out.add_(100.0)
    torch.testing.assert_close(probe.features["fc1"], expected)
    torch.testing.assert_close(probe.features["fc2"], model.fc2(expected).detach())


class _WithLogStd(nn.Module):
    """A policy-like net with a parameter no layer uses (kept in a group)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.log_std = nn.Parameter(torch.full((2,), math.nan))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.filterwarnings("ignore::plasticity_probe.NonFiniteWarning")
def test_a_group_metric_that_is_nan_survives_the_json_round_trip() -> None:
    report = pp.Probe(_WithLogStd(), probe_batch=torch.randn(8, 3)).measure()
    assert report.groups and math.isnan(report.groups[0].metrics["weight_magnitude"])
    back = pp.Report.from_dict(json.loads(report.to_json()))
    value = back.groups[0].metrics["weight_magnitude"]
    assert isinstance(value, float) and math.isnan(value)


def _strict(line: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_jsonl_sink_writes_strict_json_at_every_depth(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with pp.JsonlSink(path) as sink:
        sink.write_record({"step": 1, "value": math.nan, "d": {"a": math.inf, "b": [1.0, -math.inf]}, "l": [math.nan]})
        sink.write_scalars(2, {"loss": math.inf, "q": 0.5})
    lines = [_strict(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"step": 1, "value": None, "d": {"a": None, "b": [1.0, None]}, "l": [None]}
    assert lines[1:] == [{"step": 2, "metric": "loss", "value": None}, {"step": 2, "metric": "q", "value": 0.5}]


def test_csv_sink_header_once_across_instances_and_nan_inf_as_text(tmp_path: Path) -> None:
    import csv

    torch.manual_seed(0)
    report = pp.Probe(mlp(), probe_batch=torch.randn(16, 6)).measure()
    report.layers[0].metrics["effective_rank"] = math.nan
    path = tmp_path / "r.csv"
    with pp.CsvSink(path) as sink:
        sink.write(10, report, run="a")
    with pp.CsvSink(path) as sink:  # a second writer appends under the existing header
        sink.write(20, report, run="a")
        sink.write_scalars(30, {"loss": math.inf}, run="a")
    text = path.read_text()
    assert text.count("step,run,layer,index,metric,value") == 1
    rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) == 2 * len(report.rows()) + 1
    first = [r for r in rows if r["step"] == "10"]
    expected = [{k: str(v) for k, v in {"step": 10, "run": "a", **row}.items()} for row in report.rows()]
    assert first == expected
    assert any(r["metric"] == "effective_rank" and r["value"] == "nan" for r in first)
    assert rows[-1] == {"step": "30", "run": "a", "layer": "", "index": "", "metric": "loss", "value": "inf"}


@pytest.mark.parametrize("inplace", [False, True])
def test_gradient_metrics_are_of_the_pre_activation_also_under_an_inplace_relu(inplace: bool) -> None:
    """GraMa scores ∂L/∂z of each layer's own output z. An in-place ReLU overwrites z, and the
    gradient w.r.t. the overwritten tensor is the post-activation one (dead units got gradient
    through the mask: grad_dormant_fraction 0 instead of 1/4). Reference: z.retain_grad()."""
    torch.manual_seed(0)
    model = mlp(inplace=inplace)
    with torch.no_grad():
        model[0].bias[:4] = -1e3  # 4 of 16 units never fire
    x = torch.randn(64, 6)
    report = pp.Probe(model, probe_batch=x).measure(loss_fn=lambda: model(x).square().mean(), gradients=True)
    reference = copy.deepcopy(model)
    z = reference[0](x)
    z.retain_grad()
    reference[4](torch.relu(reference[2](torch.relu(z)))).square().mean().backward()
    assert z.grad is not None
    assert report["0"].metrics["grad_dormant_fraction"] == pytest.approx(pp.grad_dormant_fraction(z.grad)) == 0.25


class _SideStatistic(nn.Module):
    """fc1's output is read twice: |h| for a logged statistic, relu(h) by fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        self.stat = h.abs().mean()
        return self.fc2(torch.relu(h))


def test_features_are_the_branch_the_next_layer_reads_not_a_side_use() -> None:
    """The chain followed the first element-wise op on fc1's output (|h|, a logged statistic):
    those were its features. Now the branch fc2 reads (relu(h)) is."""
    torch.manual_seed(0)
    model, x = _SideStatistic(), torch.randn(32, 4)
    report = pp.Probe(model, probe_batch=x).measure()
    expected = torch.relu(model.fc1(x)).detach()
    assert report["fc1"].metrics["dead_fraction"] == pytest.approx(pp.dead_unit_fraction(expected))
    assert report["fc1"].metrics["effective_rank"] == pytest.approx(pp.effective_rank(expected), rel=1e-6)
    assert report["fc1"].metrics["feature_norm"] == pytest.approx(pp.feature_norm(expected), rel=1e-6)


class _RawRead(nn.Module):
    """fc1's output goes through a ReLU for a statistic, while fc2 reads the raw output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        self.active = torch.relu(h).gt(0).float().mean()
        return self.fc2(h)


def test_a_branch_point_read_directly_by_the_next_layer_is_the_features() -> None:
    torch.manual_seed(0)
    model, x = _RawRead(), torch.randn(32, 4)
    report = pp.Probe(model, probe_batch=x).measure()
    raw = model.fc1(x).detach()  # has negative entries: relu(h) would differ
    assert bool((raw < 0).any())
    assert report["fc1"].metrics["feature_norm"] == pytest.approx(pp.feature_norm(raw), rel=1e-6)
    assert report["fc1"].metrics["zero_fraction"] == 0.0
    reg = pp.SuccessiveRegularizer(model, penalty="singular", lam=1.0, delta=1.0)
    model(x)
    expected = float(pp.singular_penalty(raw)) + float(pp.singular_penalty(model(x).detach()))
    assert float(reg(0)) == pytest.approx(expected, rel=1e-4)
