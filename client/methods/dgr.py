"""Deep generative replay: continual learning that keeps no sample."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from client.methods.base import Method, saved_int
from client.methods.boundary import TaskBoundary
from common.method_registry import register_method
from common.seeding import derive_seed
from common.settings import Setting

GENERATOR_STREAM = 3  # derive_seed(seed, GENERATOR_STREAM): the generator's init and draws
MAX_GENERATOR_WIDTH = 4096


class ConditionalVAE(nn.Module):
    """A small class-conditional variational autoencoder over flattened inputs."""

    def __init__(self, features: int, classes: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.classes, self.latent = classes, latent
        self.encoder = nn.Sequential(nn.Linear(features + classes, hidden), nn.ReLU())
        self.to_mean = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent + classes, hidden), nn.ReLU(), nn.Linear(hidden, features),
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor, bounded: bool) -> torch.Tensor:
        """The negative evidence lower bound per sample: reconstruction plus KL to N(0, I)."""
        onehot = F.one_hot(y, self.classes).to(x.dtype)
        hidden = self.encoder(torch.cat([x, onehot], dim=1))
        mean, logvar = self.to_mean(hidden), self.to_logvar(hidden).clamp(-10, 10)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        out = self.decoder(torch.cat([z, onehot], dim=1))
        if bounded:
            recon = F.binary_cross_entropy_with_logits(out, x.clamp(0, 1), reduction="sum")
        else:
            recon = 0.5 * F.mse_loss(out, x, reduction="sum")
        kl = -0.5 * (1 + logvar - mean**2 - logvar.exp()).sum()
        return (recon + kl) / x.shape[0]

    @torch.no_grad()
    def sample(self, y: torch.Tensor, bounded: bool, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn((len(y), self.latent), generator=generator).to(y.device)
        out = self.decoder(torch.cat([z, F.one_hot(y, self.classes).float()], dim=1))
        return torch.sigmoid(out) if bounded else out


@register_method
class DeepGenerativeReplay(Method):
    """Deep generative replay (Shin et al., NeurIPS 2017), federated, with no stored sample.

    Each client keeps a small class-conditional VAE (``dgr-hidden`` wide, ``dgr-latent``
    dimensions) beside the classifier; every training step also trains it, with Adam, on the
    same batch: the new samples and the generated ones. When the client sees a task end (new
    labels, or a drift its detector found: ``client.methods.boundary``) a frozen copy of the
    generator becomes the replayer: from then on each batch of new samples is joined by as
    many samples it generates of the classes seen before, labelled by the class they were
    generated for, and distilled from the model that ended the task (its softened logits,
    weight ``dgr-distill``: what the old model said of them says more than the label). So the
    generator learns the new classes and keeps the old ones, and the classifier rehearses the
    past without a sample of it: the client's state holds the two generators and the teacher,
    weights only. The generators never leave the device.
    """

    name = "dgr"
    order = 15  # where its hooks run among the methods': after replay would, before penalties
    settings = (
        Setting("dgr-hidden", int, 200, "dgr: the generator's hidden width", minimum=8, maximum=MAX_GENERATOR_WIDTH),
        Setting("dgr-latent", int, 16, "dgr: the generator's latent dimensions", minimum=2, maximum=512),
        Setting("dgr-lr", float, 3e-3, "dgr: the generator's Adam learning rate", minimum=0, above=True),
        Setting("dgr-distill", float, 1.0, "dgr: weight of distilling the old model's outputs on generated samples "
                "(0: their labels alone)", minimum=0),
    )
    excludes = ("replay", "der")

    @classmethod
    def exclusion_reason(cls, other):
        return f"dgr replays generated samples instead of stored ones: use dgr or {other}, not both"

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(seed, options["dgr-hidden"], options["dgr-latent"], options["dgr-lr"], options["dgr-distill"])

    def __init__(self, seed: int, hidden: int = 200, latent: int = 16, lr: float = 3e-3, distill: float = 1.0) -> None:
        self.seed, self.hidden, self.latent, self.lr, self.distill = seed, hidden, latent, lr, distill
        self.boundary = TaskBoundary()
        self.generator: ConditionalVAE | None = None  # learning now
        self.replayer: ConditionalVAE | None = None  # frozen at the last boundary
        self.old_labels = torch.zeros(0, dtype=torch.long)  # what the replayer generates
        self.teacher: nn.Module | None = None  # the model that ended the last task
        self.bounded = True  # inputs within [0, 1]: a Bernoulli decoder
        self.draws = torch.Generator().manual_seed(derive_seed(seed, GENERATOR_STREAM))
        self._optimizer: torch.optim.Optimizer | None = None
        self._saved: dict[str, torch.Tensor] = {}  # state restored before the shapes were known
        self._generated = 0  # generated samples at the tail of the current batch
        self._generated_x: torch.Tensor | None = None

    def _build(self, model: nn.Module, x: torch.Tensor) -> None:
        if self.generator is not None:
            return
        with torch.no_grad():
            classes = int(model(x[:1]).shape[1])
        features = int(x[0].numel())
        state = torch.random.get_rng_state()
        torch.manual_seed(derive_seed(self.seed, GENERATOR_STREAM))
        try:
            self.generator = ConditionalVAE(features, classes, self.hidden, self.latent).to(x.device)
        finally:
            torch.random.set_rng_state(state)
        self._restore(model, x.device)

    def start_data(self, model, data, drifted):
        x = data.x.to(next(model.parameters()).device)
        self._build(model, x)
        self.bounded = self.bounded and bool(((x >= 0) & (x <= 1)).all())
        before = self.boundary.known()
        if self.boundary.see(data.y, drifted) and len(before):
            assert self.generator is not None
            self.replayer = copy.deepcopy(self.generator).eval()
            for p in self.replayer.parameters():
                p.requires_grad_(False)
            self.old_labels = before.clone()
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self._optimizer = None  # a fresh Adam each round, as the classifier's optimizer

    def extend_batch(self, x, y):
        self._generated, self._generated_x = 0, None
        if self.generator is None:
            return x, y
        if self.replayer is not None and len(self.old_labels):
            picks = torch.randint(0, len(self.old_labels), (x.shape[0],), generator=self.draws)
            old_y = self.old_labels[picks].to(y.device)
            old_x = self.replayer.sample(old_y, self.bounded, self.draws).view(x.shape[0], *x.shape[1:]).to(x.dtype)
            x, y = torch.cat([x, old_x]), torch.cat([y, old_y])
            self._generated, self._generated_x = len(old_y), old_x
        self._train_generator(x, y)
        return x, y

    def _train_generator(self, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self.generator is not None
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.lr)
        self.generator.train()
        with torch.enable_grad():
            loss = self.generator.loss(x.detach().flatten(1), y, self.bounded)
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()

    def penalty(self, model, x, logits):
        if not self._generated or self.teacher is None or self.distill == 0 or self._generated_x is None:
            return None
        t = 2.0
        with torch.no_grad():
            target = F.softmax(self.teacher(self._generated_x) / t, dim=1)
        student = F.log_softmax(logits[logits.shape[0] - self._generated :] / t, dim=1)
        return self.distill * t * t * F.kl_div(student, target, reduction="batchmean")

    def state(self):
        out: dict[str, torch.Tensor] = dict(self.boundary.state())
        if self.generator is None:
            return {**out, **self._saved}
        out.update({f"gen.{k}": v.detach().cpu() for k, v in self.generator.state_dict().items()})
        if self.replayer is not None:
            out.update({f"old.{k}": v.detach().cpu() for k, v in self.replayer.state_dict().items()})
            out["old-labels"] = self.old_labels.clone()
        if self.teacher is not None:
            out.update({f"teacher.{k}": v.detach().cpu() for k, v in self.teacher.state_dict().items()})
        out["bounded"] = torch.tensor(int(self.bounded))
        out["draws"] = self.draws.get_state()
        return out

    def load_state(self, state, device):
        self.boundary.load_state(state)
        self._saved = {k: v for k, v in state.items() if k != "labels-seen"}
        if "draws" in state:
            try:
                self.draws.set_state(state["draws"])
            except (RuntimeError, TypeError):
                pass  # not a generator state: keep the seeded draws

    def _restore(self, model: nn.Module, device: torch.device) -> None:
        """Give the generators and the teacher their saved weights, now that their shapes are known;
        a part whose weights do not fit (other settings) starts fresh instead."""
        saved, self._saved = self._saved, {}
        assert self.generator is not None
        if not saved:
            return
        self.bounded = bool(saved_int(saved, "bounded", 1, 0, 1))
        if _load(self.generator, saved, "gen."):
            replayer = copy.deepcopy(self.generator)
            labels = saved.get("old-labels")
            if (_load(replayer, saved, "old.") and labels is not None and labels.dim() == 1
                    and not labels.is_floating_point() and len(labels) and 0 <= int(labels.min())
                    and int(labels.max()) < self.generator.classes):
                self.replayer = replayer.eval().requires_grad_(False)
                self.old_labels = labels.long().clone()
        teacher = copy.deepcopy(model)
        if _load(teacher, saved, "teacher."):
            self.teacher = teacher.eval().requires_grad_(False)


def _load(module: nn.Module, saved: dict[str, torch.Tensor], prefix: str) -> bool:
    weights = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    own = module.state_dict()
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        return False
    if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
        return False
    module.load_state_dict(weights)
    return True
