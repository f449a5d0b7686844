"""Real architectures for tests/test_architectures.py, each with a ground truth written by hand.

Every ``Case`` builds a network, an input and a way to call it, and says — computed by the
test's own code, never by ``plasticity_probe`` — which layers run in which order, the features of
every layer (``expected``: a hand-written forward returning differentiable tensors, or forward
hooks registered by the test on the activation/norm/dropout modules), which parameters are
counted with which layer, and which parameters form groups with which forward index.

Feature layout of the ground truth: conv features as ``(N, C, H, W)`` (channels are the units),
everything else as ``(samples, units)`` with every leading dimension folded into the samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plasticity_probe.layers import Args  # pp.Args is not exported yet (see test_args_is_public)

Tensor = torch.Tensor


def rows(x: Tensor) -> Tensor:
    """(…, d) → (samples, d): every leading dimension is a sample."""
    return x.reshape(-1, x.shape[-1])


@dataclass
class Expect:
    """The ground truth of one pass."""

    order: list[str]
    features: dict[str, Tensor]
    params: dict[str, list[str]]  # layer -> qualified names of the parameters counted with it
    groups: dict[str, tuple[int, list[str]]] = field(default_factory=dict)  # owner -> (index, params)
    featureless: tuple[str, ...] = ()  # layers that have no features of their own (fused ops)


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[nn.Module, int], Any]  # (model, seed) -> input
    call: Callable[[nn.Module, Any], Any]  # what the user runs inside the capture block
    expected: Callable[[nn.Module, Any], Expect]
    double: bool = True  # whether the network can run in float64
    out: Callable[[Any], Tensor] = lambda y: y  # the tensor to compare/backpropagate from call()'s result


def own(module: nn.Module, prefix: str) -> list[str]:
    """Qualified names of the module's own parameters (originals of a parametrization included)."""
    return [
        f"{prefix}.{n}" if prefix else n
        for n, _ in module.named_parameters()
        if "." not in n or "parametrizations" in n
    ]


def forward_call(model: nn.Module, batch: Any) -> Any:
    return model(*batch.args, **batch.kwargs) if isinstance(batch, Args) else model(batch)


def randn(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


# ====== 1. dueling DQN
class DuelingDQN(nn.Module):
    def __init__(self, n_obs: int = 4, n_actions: int = 3, width: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_obs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.value = nn.Linear(width, 1)
        self.advantage = nn.Linear(width, n_actions)
        with torch.no_grad():  # half the trunk's output units dead on any input
            self.trunk[2].weight[: width // 2].zero_()
            self.trunk[2].bias[: width // 2].fill_(-1.0)
            self.trunk[2].bias[width // 2 :].fill_(3.0)  # and the other half alive

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        v, a = self.value(h), self.advantage(h)
        return v + a - a.mean(dim=1, keepdim=True)


def dueling_expected(m: DuelingDQN, x: Tensor) -> Expect:
    h1 = F.relu(m.trunk[0](x))
    h2 = F.relu(m.trunk[2](h1))
    feats = {"trunk.0": h1, "trunk.2": h2, "value": m.value(h2), "advantage": m.advantage(h2)}
    params = {"trunk.0": own(m.trunk[0], "trunk.0"), "trunk.2": own(m.trunk[2], "trunk.2")}
    params |= {"value": own(m.value, "value"), "advantage": own(m.advantage, "advantage")}
    return Expect(list(feats), feats, params)


# ====== 3. CleanRL Nature-CNN QNetwork
class NatureQNetwork(nn.Module):
    """CleanRL dqn_atari.py's QNetwork."""

    def __init__(self, n_actions: int = 6) -> None:
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(4, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
            nn.Linear(512, n_actions),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x / 255.0)


def nature_batch(_m: nn.Module, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, 4, 84, 84), generator=g).float()


def nature_expected(m: NatureQNetwork, x: Tensor) -> Expect:
    n = m.network
    c1 = F.relu(n[0](x / 255.0))
    c2 = F.relu(n[2](c1))
    c3 = F.relu(n[4](c2))  # post-ReLU, pre-flatten: (N, 64, 7, 7)
    f = F.relu(n[7](c3.flatten(1)))
    feats = {"network.0": c1, "network.2": c2, "network.4": c3, "network.7": f, "network.9": n[9](f)}
    return Expect(list(feats), feats, {k: own(n[int(k.split(".")[1])], k) for k in feats})


# ====== 4. IMPALA CNN (CleanRL ppo_procgen.py)
class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        inputs = x
        x = F.relu(x)
        x = self.conv0(x)
        x = F.relu(x)
        x = self.conv1(x)
        return x + inputs


class ConvSequence(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.res_block0 = ResidualBlock(out_channels)
        self.res_block1 = ResidualBlock(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        x = self.res_block0(x)
        return self.res_block1(x)


class ImpalaAgent(nn.Module):
    """CleanRL's procgen agent, small: observations (N, H, W, C) in 0..255."""

    def __init__(self, channels: tuple[int, ...] = (4, 8), size: int = 16, n_actions: int = 5) -> None:
        super().__init__()
        seqs: list[nn.Module] = []
        c = 3
        for out in channels:
            seqs.append(ConvSequence(c, out))
            c, size = out, (size + 1) // 2
        seqs += [nn.Flatten(), nn.ReLU(), nn.Linear(c * size * size, 16), nn.ReLU()]
        self.network = nn.Sequential(*seqs)
        self.actor = nn.Linear(16, n_actions)
        self.critic = nn.Linear(16, 1)

    def get_value(self, x: Tensor) -> Tensor:
        return self.critic(self.network(x.permute((0, 3, 1, 2)) / 255.0))

    def get_action_and_value(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.network(x.permute((0, 3, 1, 2)) / 255.0)
        logits = self.actor(hidden)
        return logits, self.critic(hidden)


def impala_batch(_m: nn.Module, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 16, 16, 3), generator=g).float()


def impala_expected(m: ImpalaAgent, x: Tensor) -> Expect:
    feats: dict[str, Tensor] = {}
    params: dict[str, list[str]] = {}
    h = x.permute((0, 3, 1, 2)) / 255.0
    n_seq = len(m.network) - 4
    for i in range(n_seq):
        seq: ConvSequence = m.network[i]  # type: ignore[assignment]
        p = f"network.{i}"
        h = seq.conv(h)
        feats[f"{p}.conv"] = h  # raw: the max-pool ends the chain
        h = F.max_pool2d(h, kernel_size=3, stride=2, padding=1)
        for b in ("res_block0", "res_block1"):
            blk: ResidualBlock = getattr(seq, b)
            y = F.relu(blk.conv0(F.relu(h)))  # the pre-activation ReLU acts on the block input
            feats[f"{p}.{b}.conv0"] = y
            y = blk.conv1(y)
            feats[f"{p}.{b}.conv1"] = y  # raw: up to the add
            h = y + h
    lin = f"network.{n_seq + 2}"
    hidden = F.relu(m.network[n_seq + 2](F.relu(h.flatten(1))))
    feats[lin] = hidden
    feats["actor"] = m.actor(hidden)
    feats["critic"] = m.critic(hidden)
    for name in feats:
        params[name] = own(m.get_submodule(name), name)
    return Expect(list(feats), feats, params)


# ====== 5. residual MLP, BRO, SimbaV2-ish
class ResidualMLP(nn.Module):
    def __init__(self, d_in: int = 4, width: int = 16, n_blocks: int = 2, n_out: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(n_blocks)
        )
        self.out = nn.Linear(width, n_out)
        with torch.no_grad():  # the last residual branch outputs exactly 0
            self.blocks[-1][2].weight.zero_()
            self.blocks[-1][2].bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(F.relu(h))


def resmlp_expected(m: ResidualMLP, x: Tensor) -> Expect:
    h = m.inp(x)
    feats = {"inp": h}
    for i, b in enumerate(m.blocks):
        y = F.relu(b[0](h))
        feats[f"blocks.{i}.0"] = y
        y = b[2](y)
        feats[f"blocks.{i}.2"] = y
        h = h + y
    feats["out"] = m.out(F.relu(h))
    return Expect(list(feats), feats, {k: own(m.get_submodule(k), k) for k in feats})


class BroBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(width, 4 * width), nn.LayerNorm(4 * width)
        self.fc2, self.ln2 = nn.Linear(4 * width, width), nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln2(self.fc2(F.relu(self.ln1(self.fc1(x)))))


class BroNet(nn.Module):
    def __init__(self, d_in: int = 4, width: int = 8, n_out: int = 2, zero_branch: bool = True) -> None:
        super().__init__()
        self.inp, self.inp_norm = nn.Linear(d_in, width), nn.LayerNorm(width)
        self.block = BroBlock(width)
        self.out = nn.Linear(width, n_out)
        if zero_branch:  # the branch's final LayerNorm outputs exactly 0
            with torch.no_grad():
                self.block.ln2.weight.zero_()
                self.block.ln2.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp_norm(self.inp(x)))
        h = h + self.block(h)
        return self.out(h)


def bro_expected(m: BroNet, x: Tensor) -> Expect:
    h = F.relu(m.inp_norm(m.inp(x)))
    b = m.block
    y1 = F.relu(b.ln1(b.fc1(h)))
    y2 = b.ln2(b.fc2(y1))
    feats = {"inp": h, "block.fc1": y1, "block.fc2": y2, "out": m.out(h + y2)}
    params = {
        "inp": ["inp.weight", "inp.bias", "inp_norm.weight", "inp_norm.bias"],
        "block.fc1": ["block.fc1.weight", "block.fc1.bias", "block.ln1.weight", "block.ln1.bias"],
        "block.fc2": ["block.fc2.weight", "block.fc2.bias", "block.ln2.weight", "block.ln2.bias"],
        "out": ["out.weight", "out.bias"],
    }
    return Expect(list(feats), feats, params)


class Scaler(nn.Module):
    """SimbaV2's learnable per-unit scale: a module owning only a 1-D parameter."""

    def __init__(self, d: int, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((d,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class SimbaBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.s1 = nn.Linear(width, 4 * width), Scaler(4 * width, 1.5)
        self.fc2 = nn.Linear(4 * width, width)
        self.alpha = Scaler(width, 0.3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.normalize(self.fc2(F.relu(self.s1(self.fc1(x)))), dim=-1)
        return F.normalize(x + self.alpha(y - x), dim=-1)  # LERP on the hypersphere


class SimbaNet(nn.Module):
    def __init__(self, d_in: int = 4, width: int = 8, n_out: int = 2) -> None:
        super().__init__()
        self.in_scaler = Scaler(d_in, 0.5)  # on the raw input: no layer's chain
        self.embed, self.embed_scaler = nn.Linear(d_in, width), Scaler(width, 2.0)
        self.block = SimbaBlock(width)
        self.out = nn.Linear(width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = F.normalize(self.embed_scaler(self.embed(self.in_scaler(x))), dim=-1)
        return self.out(self.block(h))


def simba_expected(m: SimbaNet, x: Tensor) -> Expect:
    h = F.normalize(m.embed(x * m.in_scaler.scale) * m.embed_scaler.scale, dim=-1)
    b = m.block
    y1 = F.relu(b.fc1(h) * b.s1.scale)
    y2 = F.normalize(b.fc2(y1), dim=-1)
    out = m.out(F.normalize(h + b.alpha.scale * (y2 - h), dim=-1))
    feats = {"embed": h, "block.fc1": y1, "block.fc2": y2, "out": out}
    params = {
        "embed": ["embed.weight", "embed.bias", "embed_scaler.scale"],
        "block.fc1": ["block.fc1.weight", "block.fc1.bias", "block.s1.scale"],
        "block.fc2": ["block.fc2.weight", "block.fc2.bias"],
        "out": ["out.weight", "out.bias"],
    }
    # in_scaler is read before any layer runs: counted with layer 1; alpha after block.fc2: with `out` (4)
    groups = {"in_scaler": (1, ["in_scaler.scale"]), "block.alpha": (4, ["block.alpha.scale"])}
    return Expect(list(feats), feats, params, groups)


# ====== 6. ResNet-18, written out as torchvision defines it
def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet18(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, 2)
        self.layer2 = self._make_layer(2 * width, 2, stride=2)
        self.layer3 = self._make_layer(4 * width, 2, stride=2)
        self.layer4 = self._make_layer(8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():  # non-trivial BN statistics and affine parameters
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet_expected(m: ResNet18, x: Tensor) -> Expect:
    feats: dict[str, Tensor] = {}
    params: dict[str, list[str]] = {}
    h = F.relu(m.bn1(m.conv1(x)))
    feats["conv1"], params["conv1"] = h, ["conv1.weight", "bn1.weight", "bn1.bias"]
    h = m.maxpool(h)
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(m, lname)):
            p = f"{lname}.{i}"
            o = F.relu(blk.bn1(blk.conv1(h)))
            feats[f"{p}.conv1"], params[f"{p}.conv1"] = o, [f"{p}.conv1.weight", f"{p}.bn1.weight", f"{p}.bn1.bias"]
            o = blk.bn2(blk.conv2(o))  # up to the in-place add
            feats[f"{p}.conv2"], params[f"{p}.conv2"] = o, [f"{p}.conv2.weight", f"{p}.bn2.weight", f"{p}.bn2.bias"]
            identity = h
            if blk.downsample is not None:
                identity = blk.downsample[1](blk.downsample[0](h))  # after the BN, before the add
                d = f"{p}.downsample"
                feats[f"{d}.0"], params[f"{d}.0"] = identity, [f"{d}.0.weight", f"{d}.1.weight", f"{d}.1.bias"]
            h = F.relu(o + identity)
    feats["fc"], params["fc"] = m.fc(torch.flatten(m.avgpool(h), 1)), ["fc.weight", "fc.bias"]
    return Expect(list(feats), feats, params)


# ====== 7. TransformerEncoderLayer
def encoder_expected(layer: nn.TransformerEncoderLayer, x: Tensor) -> Expect:
    """Eval mode (no dropout), written out from the definition of the layer."""
    bf, nf = layer.self_attn.batch_first, layer.norm_first
    a = layer.self_attn
    e, nh = a.embed_dim, a.num_heads
    src = x  # native layout: (N, L, E) with batch_first, else (L, N, E)

    def attention(h: Tensor) -> Tensor:
        h = h if bf else h.transpose(0, 1)
        q, k, v = F.linear(h, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
        n, seq = h.shape[:2]
        q, k, v = (t.reshape(n, seq, nh, e // nh).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / (e // nh) ** 0.5, dim=-1)
        o = (w @ v).transpose(1, 2).reshape(n, seq, e)
        o = F.linear(o, a.out_proj.weight, a.out_proj.bias)  # (N, L, E)
        return o if bf else o.transpose(0, 1)

    def ff(h: Tensor) -> tuple[Tensor, Tensor]:
        f1 = F.relu(layer.linear1(h))
        return f1, layer.linear2(f1)

    if nf:
        sa = attention(layer.norm1(src))
        h = src + sa
        f1, f2 = ff(layer.norm2(h))
    else:
        sa = attention(src)
        h = layer.norm1(src + sa)
        f1, f2 = ff(h)
    # the library's samples are in the layout the op saw; compare rows as sets (see same_rows)
    feats = {"self_attn.out_proj": rows(sa), "linear1": rows(f1), "linear2": rows(f2)}
    params = {
        "self_attn": ["self_attn.in_proj_weight", "self_attn.in_proj_bias"],
        "self_attn.out_proj": ["self_attn.out_proj.weight", "self_attn.out_proj.bias"],
        "linear1": ["linear1.weight", "linear1.bias"],
        "linear2": ["linear2.weight", "linear2.bias"],
    }
    # norms act on the residual stream: groups, counted with the next layer called
    groups = (
        {"norm1": (1, ["norm1.weight", "norm1.bias"]), "norm2": (3, ["norm2.weight", "norm2.bias"])}
        if nf
        else {"norm1": (3, ["norm1.weight", "norm1.bias"]), "norm2": (4, ["norm2.weight", "norm2.bias"])}
    )
    return Expect(["self_attn", *feats], feats, params, groups, featureless=("self_attn",))


def encoder_hook_truth(layer: nn.TransformerEncoderLayer, run: Callable[[], Any]) -> dict[str, Tensor]:
    """Ground truth in any mode from pre-hooks on the dropout modules: each sees the pre-dropout
    tensor (attention output, activation of linear1, output of linear2)."""
    seen: dict[str, list[Tensor]] = {}
    handles = [
        getattr(layer, d).register_forward_pre_hook(lambda _m, a, d=d: seen.setdefault(d, []).append(a[0].clone()))
        for d in ("dropout1", "dropout", "dropout2")
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {
        "self_attn.out_proj": rows(seen["dropout1"][0]),
        "linear1": rows(seen["dropout"][0]),
        "linear2": rows(seen["dropout2"][0]),
    }


def same_rows(a: Tensor, b: Tensor, **tol: Any) -> None:
    """Equal as multisets of rows (the order of samples is the op's layout, not part of the rule)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    key = torch.linspace(1.0, 2.0, a.shape[1], dtype=a.dtype)
    torch.testing.assert_close(a[torch.argsort(a @ key)], b[torch.argsort(b @ key)], **tol)


# ====== 8. recurrent
class RecurrentNet(nn.Module):
    def __init__(self, kind: str, batch_first: bool, hidden: int = 8) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(3, hidden, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: Any) -> Tensor:
        out, _ = self.rnn(x)
        if isinstance(out, nn.utils.rnn.PackedSequence):
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=self.rnn.batch_first)
        last = out[:, -1] if self.rnn.batch_first else out[-1]
        return self.head(last)


def recurrent_expected(m: RecurrentNet, x: Any) -> Expect:
    out, _ = m.rnn(x)
    if isinstance(out, nn.utils.rnn.PackedSequence):
        feats_rnn = out.data
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=m.rnn.batch_first)
    else:
        feats_rnn = rows(out)
    last = out[:, -1] if m.rnn.batch_first else out[-1]
    feats = {"rnn": feats_rnn, "head": m.head(last)}
    return Expect(list(feats), feats, {"rnn": own(m.rnn, "rnn"), "head": own(m.head, "head")})


class GRUCellNet(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.cell = nn.GRUCell(3, hidden)
        self.head = nn.Linear(hidden, 2)

    def forward(self, xs: Tensor) -> Tensor:  # (T, N, 3)
        h = xs.new_zeros(xs.shape[1], self.cell.hidden_size)
        for x in xs:
            h = self.cell(x, h)
        return self.head(h)


def user_unroll(m: GRUCellNet, xs: Tensor) -> Tensor:
    """The unroll written in the user's loop, not in the model's forward."""
    h = xs.new_zeros(xs.shape[1], m.cell.hidden_size)
    for x in xs:
        h = m.cell(x, h)
    return m.head(h)


def gru_cell_expected(m: GRUCellNet, xs: Tensor) -> Expect:
    h = xs.new_zeros(xs.shape[1], m.cell.hidden_size)
    steps = []
    for x in xs:  # GRUCell written out
        gi, gh = F.linear(x, m.cell.weight_ih, m.cell.bias_ih), F.linear(h, m.cell.weight_hh, m.cell.bias_hh)
        (ir, iz, inn), (hr, hz, hn) = gi.chunk(3, 1), gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        h = (1 - z) * torch.tanh(inn + r * hn) + z * h
        steps.append(h)
    feats = {"cell": torch.cat(steps), "head": m.head(h)}  # all steps stacked along the samples
    return Expect(list(feats), feats, {"cell": own(m.cell, "cell"), "head": own(m.head, "head")})


# ====== 9. norms and activations
class NormOrders(nn.Module):
    """Linear → LN → ReLU, then Linear → ReLU → LN, then an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 16),
            nn.LayerNorm(16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.LayerNorm(16),
            nn.Linear(16, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def norm_orders_expected(m: NormOrders, x: Tensor) -> Expect:
    n = m.net
    h1 = F.relu(n[1](n[0](x)))
    h2 = n[5](F.relu(n[3](h1)))
    feats = {"net.0": h1, "net.3": h2, "net.6": n[6](h2)}
    params = {
        "net.0": ["net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias"],
        "net.3": ["net.3.weight", "net.3.bias", "net.5.weight", "net.5.bias"],
        "net.6": ["net.6.weight", "net.6.bias"],
    }
    return Expect(list(feats), feats, params)


ACTIVATIONS: dict[str, tuple[Callable[[], Callable[[Tensor], Tensor]], Callable[[Tensor], Tensor]]] = {
    # name: (the activation the model applies, the reference function)
    "gelu-module": (nn.GELU, F.gelu),
    "gelu-functional": (lambda: F.gelu, F.gelu),
    "gelu-tanh-module": (lambda: nn.GELU(approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
    "tanh-module": (nn.Tanh, torch.tanh),
    "tanh-functional": (lambda: torch.tanh, torch.tanh),
    "tanh-inplace-method": (lambda: torch.Tensor.tanh_, torch.tanh),
    "tanh-inplace-function": (lambda: torch.tanh_, torch.tanh),
    "silu-module": (nn.SiLU, F.silu),
    "silu-module-inplace": (lambda: nn.SiLU(inplace=True), F.silu),
    "silu-functional-inplace": (lambda: lambda t: F.silu(t, inplace=True), F.silu),
    "relu-inplace-method": (lambda: torch.Tensor.relu_, F.relu),
    "relu-functional-inplace": (lambda: lambda t: F.relu(t, inplace=True), F.relu),
    "elu-module-inplace": (lambda: nn.ELU(inplace=True), F.elu),
    "leaky-relu-functional": (lambda: lambda t: F.leaky_relu(t, 0.1), lambda t: F.leaky_relu(t, 0.1)),
}


class ActNet(nn.Module):
    def __init__(self, act: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2)
        made = ACTIVATIONS[act][0]()
        self.act = made if isinstance(made, nn.Module) else None
        self._fn = None if isinstance(made, nn.Module) else made

    def f(self, x: Tensor) -> Tensor:
        return self.act(x) if self.act is not None else self._fn(x)  # type: ignore[misc]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.f(self.fc2(self.f(self.fc1(x)))))


def act_expected(act: str) -> Callable[[ActNet, Tensor], Expect]:
    ref = ACTIVATIONS[act][1]

    def expected(m: ActNet, x: Tensor) -> Expect:
        h1 = ref(m.fc1(x))
        h2 = ref(m.fc2(h1))
        feats = {"fc1": h1, "fc2": h2, "fc3": m.fc3(h2)}
        return Expect(list(feats), feats, {k: [f"{k}.weight", f"{k}.bias"] for k in feats})

    return expected


# ====== 10. weight parametrizations
class ReparamNet(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        fc1, fc2 = nn.Linear(4, 16), nn.Linear(16, 2)
        if how == "weight_norm":
            fc1 = nn.utils.parametrizations.weight_norm(fc1)
        elif how == "spectral_norm":
            fc1 = nn.utils.parametrizations.spectral_norm(fc1)
        elif how == "old_weight_norm":
            fc1 = torch.nn.utils.weight_norm(fc1)
        self.how, self.fc1, self.fc2 = how, fc1, fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def reparam_expected(m: ReparamNet, x: Tensor) -> Expect:
    if m.how == "weight_norm":
        g, v = m.fc1.parametrizations.weight.original0, m.fc1.parametrizations.weight.original1
        w = g * v / v.norm(dim=1, keepdim=True)
        p1 = ["fc1.bias", "fc1.parametrizations.weight.original0", "fc1.parametrizations.weight.original1"]
    elif m.how == "old_weight_norm":
        g, v = m.fc1.weight_g, m.fc1.weight_v
        w = g * v / v.norm(dim=1, keepdim=True)
        p1 = ["fc1.bias", "fc1.weight_g", "fc1.weight_v"]
    else:  # spectral norm, eval mode: the stored power-iteration vectors, no update
        assert not m.training
        orig = m.fc1.parametrizations.weight.original
        u, v = m.fc1.parametrizations.weight[0]._u, m.fc1.parametrizations.weight[0]._v
        w = orig / torch.dot(u, orig @ v)
        p1 = ["fc1.bias", "fc1.parametrizations.weight.original"]
    h = F.relu(F.linear(x, w, m.fc1.bias))
    feats = {"fc1": h, "fc2": m.fc2(h)}
    return Expect(list(feats), feats, {"fc1": p1, "fc2": ["fc2.weight", "fc2.bias"]})


# ====== 11., 14. conv layouts
class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(6 * 6 * 6, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def small_conv_expected(m: SmallConv, x: Tensor) -> Expect:
    n = m.net
    c1 = F.relu(n[0](x))
    c2 = torch.tanh(n[2](c1))
    feats = {"net.0": c1, "net.2": c2, "net.5": n[5](c2.flatten(1))}
    return Expect(list(feats), feats, {k: [f"{k}.weight", f"{k}.bias"] for k in feats})


class ConvTokens(nn.Module):
    """conv → ReLU → permute(0, 2, 3, 1) → Linear over the channels (a ConvNeXt/ViT-style projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.proj = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.conv(x)).permute(0, 2, 3, 1))


def conv_tokens_expected(m: ConvTokens, x: Tensor) -> Expect:
    c = F.relu(m.conv(x))
    feats = {"conv": c, "proj": rows(m.proj(c.permute(0, 2, 3, 1)))}
    return Expect(list(feats), feats, {k: [f"{k}.weight", f"{k}.bias"] for k in feats})


# ====== 12., 13. siamese, non-forward method
class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(16, 1)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head(torch.cat([self.encoder(a), self.encoder(b)], dim=1))


def siamese_expected(m: Siamese, batch: Args) -> Expect:
    a, b = batch.args
    e = m.encoder
    ha, hb = F.relu(e[0](a)), F.relu(e[0](b))
    ea, eb = e[2](ha), e[2](hb)
    feats = {"encoder.0": torch.cat([ha, hb]), "encoder.2": torch.cat([ea, eb]), "head": m.head(torch.cat([ea, eb], 1))}
    return Expect(list(feats), feats, {k: [f"{k}.weight", f"{k}.bias"] for k in feats})


class ActorCriticMethods(nn.Module):
    """An agent used only through ``act`` (its forward is never called)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 16)
        self.pi = nn.Linear(16, 3)
        self.v = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - never used
        raise NotImplementedError

    def act(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.body(x))
        return self.v(h), torch.log_softmax(self.pi(h), dim=-1)


def methods_expected(m: ActorCriticMethods, x: Tensor) -> Expect:
    h = torch.tanh(m.body(x))
    feats = {"body": h, "v": m.v(h), "pi": m.pi(h)}
    return Expect(list(feats), feats, {k: [f"{k}.weight", f"{k}.bias"] for k in feats})


# ====== more rules: a layer reused in depth, weights read by a parent, dropout/BN in train mode
class ReusedInDepth(nn.Module):
    """The same Linear applied twice in a row (weight sharing in depth): both calls, stacked."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(F.relu(self.shared(F.relu(self.shared(h)))))


def reused_expected(m: ReusedInDepth, x: Tensor) -> Expect:
    h = torch.tanh(m.inp(x))
    s1 = F.relu(m.shared(h))
    s2 = F.relu(m.shared(s1))
    feats = {"inp": h, "shared": torch.cat([s1, s2]), "out": m.out(s2)}
    return Expect(list(feats), feats, {k: [f"{k}.weight", f"{k}.bias"] for k in feats})


class ParentReadsWeights(nn.Module):
    """``fc``'s forward is never called: the parent applies its weight with F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.silu(F.linear(x, self.fc.weight, self.fc.bias)))


def parent_reads_expected(m: ParentReadsWeights, x: Tensor) -> Expect:
    h = F.silu(F.linear(x, m.fc.weight, m.fc.bias))
    feats = {"fc": h, "head": m.head(h)}
    return Expect(list(feats), feats, {k: [f"{k}.weight", f"{k}.bias"] for k in feats})


class DropoutBNNet(nn.Module):
    """Train/eval-sensitive modules: BatchNorm1d and dropout (module and functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.dropout(self.drop(F.relu(self.bn(self.fc1(x)))), 0.2, self.training))


def dropout_bn_truth(m: DropoutBNNet, run: Callable[[], Any]) -> dict[str, Tensor]:
    """fc1's features are what the dropout module receives (pre-dropout), in any mode."""
    seen: list[Tensor] = []
    handle = m.drop.register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    try:
        run()
    finally:
        handle.remove()
    return {"fc1": seen[0]}


# ====== the registry of plain-PyTorch cases
def _x(*shape: int) -> Callable[[nn.Module, int], Tensor]:
    return lambda _m, seed: randn(*shape, seed=seed)


def _packed(batch_first: bool) -> Callable[[nn.Module, int], Any]:
    def make(_m: nn.Module, seed: int) -> Any:
        seqs = [randn(t, 3, seed=seed + t) for t in (5, 3, 4)]
        return nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)

    return make


def _two(_m: nn.Module, seed: int) -> Args:
    return Args(randn(6, 4, seed=seed), randn(6, 4, seed=seed + 1))


def _rnn_x(batch_first: bool) -> Callable[[nn.Module, int], Tensor]:
    return (lambda _m, s: randn(4, 5, 3, seed=s)) if batch_first else (lambda _m, s: randn(5, 4, 3, seed=s))


def _cast(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Args):
        return Args(*(_cast(a, dtype) for a in batch.args))
    if isinstance(batch, nn.utils.rnn.PackedSequence):
        return batch._replace(data=batch.data.to(dtype))
    return batch


def _channels_last_model() -> nn.Module:
    return SmallConv().to(memory_format=torch.channels_last)


def _channels_last_x(_m: nn.Module, seed: int) -> Tensor:
    return randn(3, 3, 8, 8, seed=seed).contiguous(memory_format=torch.channels_last)


CASES: list[Case] = [
    Case("dueling_dqn", DuelingDQN, _x(32, 4), forward_call, dueling_expected),
    Case("nature_cnn", NatureQNetwork, nature_batch, forward_call, nature_expected, double=False),
    Case(
        "impala_get_action_and_value",
        ImpalaAgent,
        impala_batch,
        lambda m, x: m.get_action_and_value(x),
        impala_expected,
        out=lambda y: y[0].sum() + y[1].sum(),
    ),
    Case("residual_mlp", ResidualMLP, _x(32, 4), forward_call, resmlp_expected),
    Case("bro", BroNet, _x(32, 4), forward_call, bro_expected),
    Case("simba", SimbaNet, _x(32, 4), forward_call, simba_expected),
    Case("resnet18", ResNet18, _x(2, 3, 32, 32), forward_call, resnet_expected),
    Case("lstm_batch_first", lambda: RecurrentNet("lstm", True), _rnn_x(True), forward_call, recurrent_expected),
    Case("lstm_time_first", lambda: RecurrentNet("lstm", False), _rnn_x(False), forward_call, recurrent_expected),
    Case("gru_batch_first", lambda: RecurrentNet("gru", True), _rnn_x(True), forward_call, recurrent_expected),
    Case("gru_time_first", lambda: RecurrentNet("gru", False), _rnn_x(False), forward_call, recurrent_expected),
    Case("lstm_packed", lambda: RecurrentNet("lstm", True), _packed(True), forward_call, recurrent_expected),
    Case("gru_packed", lambda: RecurrentNet("gru", False), _packed(False), forward_call, recurrent_expected),
    Case("gru_cell_forward_unroll", GRUCellNet, _x(5, 4, 3), forward_call, gru_cell_expected),
    Case("gru_cell_user_unroll", GRUCellNet, _x(5, 4, 3), user_unroll, gru_cell_expected),
    Case("linear_ln_relu_and_linear_relu_ln", NormOrders, _x(32, 4), forward_call, norm_orders_expected),
    *[Case(f"act_{a}", lambda a=a: ActNet(a), _x(32, 4), forward_call, act_expected(a)) for a in ACTIVATIONS],
    Case("weight_norm", lambda: ReparamNet("weight_norm"), _x(32, 4), forward_call, reparam_expected),
    Case("spectral_norm", lambda: ReparamNet("spectral_norm").eval(), _x(32, 4), forward_call, reparam_expected),
    Case("old_weight_norm", lambda: ReparamNet("old_weight_norm"), _x(32, 4), forward_call, reparam_expected),
    Case("conv", SmallConv, _x(3, 3, 8, 8), forward_call, small_conv_expected),
    Case("conv_channels_last", _channels_last_model, _channels_last_x, forward_call, small_conv_expected, double=False),
    Case("conv_permute_linear", ConvTokens, _x(2, 3, 5, 5), forward_call, conv_tokens_expected),
    Case("siamese", Siamese, _two, forward_call, siamese_expected),
    Case("reused_in_depth", ReusedInDepth, _x(16, 4), forward_call, reused_expected),
    Case("parent_reads_weights", ParentReadsWeights, _x(16, 4), forward_call, parent_reads_expected),
    Case(
        "non_forward_method",
        ActorCriticMethods,
        _x(16, 4),
        lambda m, x: m.act(x),
        methods_expected,
        out=lambda y: y[0].sum() + y[1].sum(),
    ),
]
CASES += [
    Case(
        f"transformer_bf{int(bf)}_nf{int(nf)}",
        lambda bf=bf, nf=nf: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=bf, norm_first=nf).eval(),
        _x(3, 5, 8),
        forward_call,
        encoder_expected,
    )
    for bf in (True, False)
    for nf in (True, False)
]


def prepare(case: Case, seed: int = 0, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """The network (seeded) and its input; float64 unless the case cannot run in it."""
    dtype = dtype or (torch.float64 if case.double else torch.float32)
    torch.manual_seed(seed)
    model = case.build()
    was_training = model.training
    model = model.to(dtype)
    model.train(was_training)
    return model, _cast(case.batch(model, seed), dtype)
