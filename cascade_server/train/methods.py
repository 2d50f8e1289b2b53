"""Distillation methods, keyed by the names users type: ce, kd, md, cd1, cd2, cd3, kdplus,
disk, bdistil. Each has a `Params` dataclass (the knobs, with the papers' defaults) and
`train(ctx, params) -> StudentResult`. Most are a loss in the shared loop; KD+, DiSK and
B-DISTIL own their steps."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..registry import Registry
from .device import chunked, device_of, to_device
from .engine import Batch, FitConfig, Trainer, fit, seed_everything
from .losses import LOSSES, KDPlus, ScaffoldedLoss, WeightedResidual
from .models import Classifier, build

log = logging.getLogger(__name__)
METHODS: Registry = Registry("method")


@dataclass
class Context:
    x_train: np.ndarray  # float32, normalised
    y_train: np.ndarray
    in_shape: tuple[int, ...]
    num_classes: int
    teacher: Any | None  # TorchTeacher | OnnxTeacher
    student_arch: str
    student_kwargs: dict
    fit: FitConfig
    teacher_logits: np.ndarray | None = None  # on x_train, cached by the caller
    # Trains a fresh teacher on (x, y): for cross-fitted teacher logits (MD).
    retrain_teacher: Callable[[np.ndarray, np.ndarray, int], Any] | None = None
    checkpoint_dir: Any | None = None
    checkpoint_key: str = ""

    def build_student(self, outputs: int | None = None) -> Classifier:
        seed_everything(self.fit.seed)  # the same initial weights for the same config
        return build(
            self.student_arch, self.in_shape, outputs or self.num_classes, **self.student_kwargs
        )

    def train_logits(self) -> np.ndarray:
        if self.teacher_logits is None:
            self.teacher_logits = self.teacher.logits(self.x_train)
        return self.teacher_logits

    def checkpoint(self, name: str):
        return self.checkpoint_dir / f"{name}.ckpt" if self.checkpoint_dir else None


@dataclass
class StudentResult:
    model: nn.Module  # forward(x) -> logits of the (last stage of the) student
    history: list[float]
    output_classes: list[int] | None = None  # class id per output; -1 = abstain
    abstain_output: int | None = None
    in_domain_classes: list[int] | None = None  # class-based delegation
    stages: int = 1  # B-DISTIL: cumulative stage outputs


def params_for(method: str, overrides: dict[str, Any] | None = None):
    """The method's Params with `overrides` (unknown keys raise, listing the valid ones)."""
    cls = METHODS.get(method).Params
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides or {}) - names)
    if unknown:
        raise ValueError(f"{method} has no parameter {unknown}; it takes: {sorted(names)}")
    return cls(**(overrides or {}))


def describe_methods() -> str:
    lines = []
    for name in METHODS.names():
        m = METHODS.get(name)
        knobs = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(m.Params))
        lines.append(f"{name:8s} {m.summary}\n         {knobs or '(no parameters)'}")
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "?"


class _LossMethod:
    """A loss in the shared loop on fixed inputs with cached teacher logits."""

    loss_name = ""
    needs_teacher = True

    def loss(self, ctx: Context, params) -> nn.Module:
        return LOSSES.get(self.loss_name)(**dataclasses.asdict(params))

    def teacher_targets(self, ctx: Context, params) -> np.ndarray | None:
        return ctx.train_logits() if self.needs_teacher else None

    def train(self, ctx: Context, params) -> StudentResult:
        student = ctx.build_student()
        history = fit(
            student,
            self.loss(ctx, params),
            ctx.x_train,
            ctx.y_train,
            ctx.fit,
            teacher_logits=self.teacher_targets(ctx, params),
            desc=f"student ({self.loss_name})",
            checkpoint=ctx.checkpoint("student"),
            key=ctx.checkpoint_key,
        )
        return StudentResult(student, history)


@METHODS.register("ce")
class CE(_LossMethod):
    summary = "labels only, no teacher (baseline)"
    loss_name = "ce"
    needs_teacher = False

    @dataclass
    class Params:
        pass


@METHODS.register("kd")
class KD(_LossMethod):
    summary = "a CE(y) + b T^2 KL(teacher || student) (Hinton; the cascade paper uses a=0, b=1)"
    loss_name = "kd"

    @dataclass
    class Params:
        a: float = 0.0
        b: float = 1.0
        temperature: float = 4.0


@METHODS.register("md")
class MD(_LossMethod):
    summary = (
        "margin-based: teacher targets on easy items, a*LS(y)+b*p_t on hard ones "
        "(teacher margin <= rho_train), from held-out teacher logits"
    )
    loss_name = "md"

    @dataclass
    class Params:
        a: float = 0.5
        b: float = 0.5
        alpha: float = 0.6
        rho_train: float = 0.4
        # Where the teacher logits that decide easy/hard come from. "augment": the teacher on a
        # shifted view (and optional Gaussian noise) of each item, which works with any teacher
        # (noise is off by default: a Fashion-MNIST CNN fell from 90% to 23% under noise 0.3,
        # while a 1-pixel shift costs it 2 points); "crossfit":
        # out-of-fold logits of `folds` teachers retrained without the item (costs `folds`
        # teacher trainings); "train": plain logits (over-confident: MD collapses to KD).
        teacher_logits: str = "augment"
        folds: int = 3
        noise: float = 0.0
        shift: int = 1
        token_dropout: float = 0.15  # texts: share of tokens removed from the view

    def loss(self, ctx: Context, params) -> nn.Module:
        p = params
        return LOSSES.get("md")(a=p.a, b=p.b, alpha=p.alpha, rho_train=p.rho_train)

    def teacher_targets(self, ctx: Context, params) -> np.ndarray:
        if params.teacher_logits == "train":
            return ctx.train_logits()
        if params.teacher_logits == "augment":
            return augmented_logits(
                ctx.teacher,
                ctx.x_train,
                params.noise,
                params.shift,
                seed=ctx.fit.seed,
                token_dropout=params.token_dropout,
            )
        if params.teacher_logits == "crossfit":
            if ctx.retrain_teacher is None:
                raise ValueError("crossfit needs a teacher trained by cascade-train (not imported)")
            return crossfit_logits(ctx, params.folds)
        raise ValueError(
            f"teacher_logits must be augment, crossfit or train, not {params.teacher_logits!r}"
        )


def augmented_logits(
    teacher, x: np.ndarray, noise: float, shift: int, seed: int, token_dropout: float = 0.15
) -> np.ndarray:
    """Teacher logits on one perturbed view of each input: images shifted by up to `shift`
    pixels plus Gaussian noise of `noise` (normalised units); texts with a share
    `token_dropout` of their tokens removed."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(x.dtype, np.integer):
        drop = (rng.random(x.shape) < token_dropout) & (x != 0)
        return teacher.logits(np.where(drop, 0, x))
    views = np.empty_like(x)
    for i in range(len(x)):
        dy, dx = rng.integers(-shift, shift + 1, size=2) if shift else (0, 0)
        views[i] = np.roll(x[i], (int(dy), int(dx)), axis=(-2, -1))
    views += rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    return teacher.logits(views.astype(np.float32))


def crossfit_logits(ctx: Context, folds: int) -> np.ndarray:
    """Out-of-fold teacher logits: each item scored by a teacher that never saw it."""
    rng = np.random.default_rng(ctx.fit.seed)
    assignment = rng.integers(0, folds, size=len(ctx.y_train))
    out = np.zeros((len(ctx.y_train), ctx.num_classes), np.float32)
    for k in range(folds):
        held = assignment == k
        teacher = ctx.retrain_teacher(ctx.x_train[~held], ctx.y_train[~held], k)
        out[held] = teacher.logits(ctx.x_train[held])
    return out


@dataclass
class _CDParams:
    # The in-domain class set L_in: an explicit list of class ids, or the k most frequent
    # training classes (default: 30% of the classes, as 30 of CIFAR-100's 100).
    in_domain: list[int] | None = None
    top_k_classes: int | None = None
    alpha: float = 0.4
    # Delegate when the student's argmax is outside L_in (CD-I/II; CD-III abstains instead).
    class_delegation: bool = True


def in_domain_classes(ctx: Context, params: _CDParams) -> list[int]:
    if params.in_domain:
        classes = sorted(int(c) for c in params.in_domain)
        if not all(0 <= c < ctx.num_classes for c in classes):
            raise ValueError(f"in_domain class ids must be within [0, {ctx.num_classes})")
        return classes
    k = params.top_k_classes or max(1, round(0.3 * ctx.num_classes))
    counts = np.bincount(ctx.y_train, minlength=ctx.num_classes)
    # Stable: ties go to the lower class id.
    return sorted(int(c) for c in np.argsort(-counts, kind="stable")[:k])


class _CDMethod(_LossMethod):
    Params = _CDParams

    def train(self, ctx: Context, params: _CDParams) -> StudentResult:
        classes = in_domain_classes(ctx, params)
        loss = LOSSES.get(self.loss_name)(in_domain=classes, alpha=params.alpha)
        student = ctx.build_student(self.outputs(ctx, classes))
        history = fit(
            student,
            loss,
            ctx.x_train,
            ctx.y_train,
            ctx.fit,
            teacher_logits=ctx.train_logits(),
            desc=f"student ({self.loss_name})",
            checkpoint=ctx.checkpoint("student"),
            key=ctx.checkpoint_key,
        )
        return self.result(student, history, classes, params)

    def outputs(self, ctx: Context, classes: list[int]) -> int:
        return ctx.num_classes

    def result(self, student, history, classes, params) -> StudentResult:
        return StudentResult(
            student, history, in_domain_classes=classes if params.class_delegation else None
        )


@METHODS.register("cd1")
class CD1(_CDMethod):
    summary = "class-specific I: teacher targets on L_in, label-smoothed one-hot elsewhere"
    loss_name = "cd1"


@METHODS.register("cd2")
class CD2(_CDMethod):
    summary = "class-specific II: teacher renormalised to L_in in-domain, uniform elsewhere"
    loss_name = "cd2"


@METHODS.register("cd3")
class CD3(_CDMethod):
    summary = "class-specific III: |L_in|+1 outputs, out-of-domain items learn to abstain"
    loss_name = "cd3"

    def outputs(self, ctx: Context, classes: list[int]) -> int:
        return len(classes) + 1

    def result(self, student, history, classes, params) -> StudentResult:
        return StudentResult(
            student, history, output_classes=[*classes, -1], abstain_output=len(classes)
        )


@METHODS.register("kdplus")
class KDPlusMethod:
    summary = "KD+ : KD on the data plus KD on interpolated inputs, labelled online by the teacher"
    needs_teacher = True

    @dataclass
    class Params:
        w_ce: float = 1.0
        w_kd: float = 1.0
        w_mix: float = 1.0
        temperature: float = 4.0
        beta: float = 1.0  # lam ~ Beta(beta, beta)

    def train(self, ctx: Context, params) -> StudentResult:
        loss = KDPlus(params.w_ce, params.w_kd, params.w_mix, params.temperature)
        mixer = torch.distributions.Beta(params.beta, params.beta)
        teacher = ctx.teacher

        student = ctx.build_student()

        def step(model: nn.Module, b: Batch):
            partner = torch.randperm(len(b.x))
            logits = model(b.x)
            if torch.is_floating_point(b.x):
                lam = mixer.sample((len(b.x),)).view(-1, *[1] * (b.x.dim() - 1))
                mixed = lam * b.x + (1 - lam) * b.x[partner]
                # The teacher labels the interpolated inputs themselves: online, never cached.
                teacher_mix = teacher.torch_logits(mixed)
                student_mix = model(mixed)
            else:
                student_mix, teacher_mix = _mix_text(student, teacher, b.x, partner, mixer)
            value = loss(
                logits, b.t, b.y, student_mix_logits=student_mix, teacher_mix_logits=teacher_mix
            )
            return value, logits

        history = fit(
            student,
            step,
            ctx.x_train,
            ctx.y_train,
            ctx.fit,
            teacher_logits=ctx.train_logits(),
            desc="student (kdplus)",
            checkpoint=ctx.checkpoint("student"),
            key=ctx.checkpoint_key,
        )
        return StudentResult(student, history)


def _mix_text(student, teacher, ids: torch.Tensor, partner: torch.Tensor, mixer):
    """KD+ for text: interpolate in embedding space. Each model mixes its own embeddings of
    the same pairs with the same lam (token ids cannot be interpolated), over the union of the
    two masks; the teacher labels the mixture online."""
    model = getattr(teacher, "model", None)
    if model is None or not hasattr(model, "forward_embedded"):
        raise ValueError("kdplus on text mixes in embedding space: it needs a PyTorch text teacher")
    lam = mixer.sample((len(ids),)).view(-1, 1, 1)
    mask = ids != 0
    mix_mask = mask | mask[partner]
    emb_s = student.body.embed(ids)
    student_mix = student.forward_embedded(lam * emb_s + (1 - lam) * emb_s[partner], mix_mask)
    with torch.no_grad():
        emb_t = model.body.embed(ids)
        teacher_mix = model.forward_embedded(lam * emb_t + (1 - lam) * emb_t[partner], mix_mask)
    return student_mix, teacher_mix


class Guide(nn.Module):
    """DiSK's training-only guide g(x) in (0, 1): a small MLP on teacher logits or features."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(z)).squeeze(1)


def disk_lambda(epoch: int, lo: float, hi: float, period: int) -> float:
    """Cycles up from `lo` to `hi` (cosine) every `period` epochs."""
    phase = (epoch % period) / period
    return lo + (hi - lo) * (1 - math.cos(math.pi * phase)) / 2


def disk_delta(epoch: int, start: float, decay: float, floor: float, period: int) -> float:
    """Cycles down from start*decay^k to `floor` within the k-th period."""
    k, phase = divmod(epoch, period)
    top = max(start * decay**k, floor)
    return floor + (top - floor) * (1 + math.cos(math.pi * phase / period)) / 2


@METHODS.register("disk")
class DiSK:
    summary = "DiSK: a training-only guide scaffolds the student on what it cannot learn"
    needs_teacher = True

    @dataclass
    class Params:
        top_k: int = 10
        t_teacher: float = 4.0
        t_student: float = 3.5
        w_aux: float = 0.1
        w_nll: float = 0.9
        max_ce: float = 5.0
        lambda_min: float = 1.0
        lambda_max: float = 5.0
        lambda_period: int = 50
        delta_start: float = 0.6
        delta_decay: float = 0.9
        delta_min: float = 0.4
        delta_period: int = 20
        guide_warmup: int = 2  # epochs of guide-only training first
        student_passes: int = 3  # kt
        guide_passes: int = 3  # kg
        guide_input: str = "logits"  # or "features" (PyTorch teachers)
        guide_hidden: int = 64
        guide_lr: float = 1e-3

    def train(self, ctx: Context, params) -> StudentResult:
        p = params
        loss = ScaffoldedLoss(p.top_k, p.t_teacher, p.t_student, p.w_aux, p.w_nll, p.max_ce)
        t_logits = torch.from_numpy(ctx.train_logits())
        device = torch.device(ctx.fit.device)
        if p.guide_input == "features":
            teacher_device = getattr(ctx.teacher, "device", "cpu")
            z = torch.from_numpy(chunked(ctx.teacher.features, ctx.x_train, teacher_device))
        elif p.guide_input == "logits":
            z = t_logits
        else:
            raise ValueError("guide_input must be logits or features")
        z = z.to(device)  # the guide trains on the student's device; batches index it there
        student = ctx.build_student()
        seed_everything(ctx.fit.seed)
        guide = Guide(z.shape[1], p.guide_hidden)
        epochs = ctx.fit.epochs
        state = {"lam": p.lambda_min, "delta": p.delta_start}

        def student_step(model: nn.Module, b: Batch):
            with torch.no_grad():
                g = guide(z[b.idx])
            logits = model(b.x)
            return loss(logits, b.t, b.y, guide=g), logits

        def guide_step(model: nn.Module, b: Batch):
            with torch.no_grad():
                s_logits = student(b.x)
            g = model(z[b.idx])
            return loss.guide_loss(s_logits, b.t, b.y, g, state["lam"], state["delta"]), None

        gen = torch.Generator().manual_seed(ctx.fit.seed)
        s_trainer = Trainer(
            student,
            student_step,
            ctx.x_train,
            ctx.y_train,
            ctx.fit,
            teacher_logits=t_logits.numpy(),
            epochs=epochs * p.student_passes,
            generator=gen,
        )
        g_fit = dataclasses.replace(ctx.fit, lr=p.guide_lr)
        g_trainer = Trainer(
            guide,
            guide_step,
            ctx.x_train,
            ctx.y_train,
            g_fit,
            teacher_logits=t_logits.numpy(),
            epochs=p.guide_warmup + epochs * p.guide_passes,
            generator=gen,
        )
        for _ in range(p.guide_warmup):
            g_trainer.run_epoch()
        history = []
        bar = tqdm(range(epochs), desc="student (disk)", leave=False, disable=not ctx.fit.progress)
        for epoch in bar:
            state["lam"] = disk_lambda(epoch, p.lambda_min, p.lambda_max, p.lambda_period)
            state["delta"] = disk_delta(
                epoch, p.delta_start, p.delta_decay, p.delta_min, p.delta_period
            )
            losses = [s_trainer.run_epoch() for _ in range(p.student_passes)]
            for _ in range(p.guide_passes):
                g_trainer.run_epoch()
            history.append(losses[-1])
            with torch.no_grad():
                mean_g = float(guide(z).mean())
            bar.set_postfix(
                loss=f"{history[-1]:.4f}",
                acc=f"{s_trainer.last_accuracy:.3f}",
                guide=f"{mean_g:.3f}",
            )
        student.eval()
        return StudentResult(student, history)


class Ensemble(nn.Module):
    """B-DISTIL's anytime ensemble: F_k = sum_{j<=k} eta_j f_j. `forward` returns F_T;
    `stages` every F_k. With `connect`, member k's head also reads member k-1's features."""

    def __init__(self, members: list[Classifier], etas: list[float], connect: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("etas", torch.tensor(etas, dtype=torch.float32))
        self.connect = connect

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs, prev = [], None
        for m in self.members:
            feat = m.features(x)
            head_in = (
                torch.cat([feat, prev], dim=1) if (self.connect and prev is not None) else feat
            )
            outs.append(m.head(head_in))
            prev = feat.detach()
        return outs

    def last_member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """f_T alone (training of the newest member): earlier members only lend features."""
        last = self.members[-1]
        feat = last.features(x)
        if self.connect and len(self.members) > 1:
            with torch.no_grad():
                prev = self.members[-2].features(x)
            feat = torch.cat([feat, prev], dim=1)
        return last.head(feat)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        total, out = 0, []
        for eta, f in zip(self.etas, self.member_logits(x), strict=True):
            total = total + eta * f
            out.append(total)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)[-1]


class StagedOutputs(nn.Module):
    """For export: `logits` (F_T) then `stage_1` .. `stage_T`."""

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor):
        stages = self.ensemble.stages(x)
        return (stages[-1], *stages)


@METHODS.register("bdistil")
class BDistil:
    summary = (
        "B-DISTIL (reconstruction): boosting T small members toward the teacher's logits; "
        "anytime prediction after each member"
    )
    needs_teacher = True

    @dataclass
    class Params:
        members: int = 3
        beta: float = 0.5  # exponential weights on the (scaled) residual
        connect: bool = False  # member k's head also reads member k-1's features
        member_kwargs: dict = field(default_factory=dict)  # overrides of the student kwargs

    def train(self, ctx: Context, params) -> StudentResult:
        if params.members < 1:
            raise ValueError("members must be at least 1")
        # Logits are shift-invariant: centring each row removes scale the members need not fit.
        g = ctx.train_logits()
        g = g - g.mean(axis=1, keepdims=True)
        weigher = WeightedResidual(params.beta)
        members: list[Classifier] = []
        etas: list[float] = []
        history: list[float] = []
        current = np.zeros_like(g)
        kwargs = {**ctx.student_kwargs, **params.member_kwargs}
        prev_dim = 0
        for t in range(params.members):
            member = build(ctx.student_arch, ctx.in_shape, ctx.num_classes, **kwargs)
            if params.connect and prev_dim:
                member.head = nn.Linear(member.feature_dim + prev_dim, ctx.num_classes)
            residual = to_device(g - current, ctx.fit.device)
            ensemble = Ensemble([*members, member], [*etas, 1.0], params.connect)
            for m in members:  # earlier members stay fixed
                m.requires_grad_(False)

            def step(model: nn.Module, b: Batch, ens=ensemble, r=residual, fixed=tuple(members)):
                for m in fixed:  # keep their BatchNorm statistics as they were
                    m.eval()
                f_t = ens.last_member_logits(b.x)
                return weigher(f_t, None, b.y, residual=r[b.idx]), None

            fit_cfg = dataclasses.replace(ctx.fit, seed=ctx.fit.seed + t)
            history += fit(
                ensemble,
                step,
                ctx.x_train,
                ctx.y_train,
                fit_cfg,
                desc=f"bdistil member {t + 1}/{params.members}",
                parameters=member.parameters(),
            )
            with torch.no_grad():
                ensemble.eval()
                f = chunked(ensemble.last_member_logits, ctx.x_train, device_of(ensemble))
            eta = line_search(f, g - current, weigher)
            members.append(member)
            etas.append(eta)
            current = current + eta * f
            prev_dim = member.feature_dim
            log.info(
                "bdistil member %d: eta %.3f, agreement with teacher %.3f",
                t + 1,
                eta,
                float((current.argmax(1) == g.argmax(1)).mean()),
            )
        model = Ensemble(members, etas, params.connect).eval()
        model.requires_grad_(True)
        return StudentResult(model, history, stages=params.members)


def line_search(f: np.ndarray, residual: np.ndarray, weigher: WeightedResidual) -> float:
    """eta minimising sum w (eta f - r)^2, in closed form (w from the residual)."""
    w = weigher.weights(torch.from_numpy(residual)).numpy()
    denom = float((w * f * f).sum())
    return float((w * f * residual).sum() / denom) if denom > 0 else 0.0
