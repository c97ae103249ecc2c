"""A tiny GAN LightningModule with manual optimization.

Shared by fixtures/make_fixtures.py (part ``lightning_gan``, which trains it with
``G_OPT = "sgd"`` and keeps the Trainer's checkpoint as fixtures/lightning_gan/*.ckpt) and
tests/test_convert_lightning.py (which converts the generator optimizer of that checkpoint to
Adam and resumes it under the Trainer with ``G_OPT = "adam"``). Changing anything here that
the fixture depends on (layer shapes, data, optimizers, schedulers) means regenerating the
fixtures.

Every optimizer step counts as a Trainer step under manual optimization, so one batch (a
discriminator step and a generator step) advances ``trainer.global_step`` by 2.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

BATCHES = 3  # batches per epoch
BATCH_SIZE = 2
STEPS_PER_BATCH = 2  # optimizer steps (D, then G) per batch = global_step increments


def dataloader() -> DataLoader:
    """Fixed "real" samples (3-D) and generator noise (2-D): BATCHES batches, not shuffled."""
    g = torch.Generator().manual_seed(7)
    n = BATCHES * BATCH_SIZE
    real = torch.randn(n, 3, generator=g) * 0.5 + 1.0
    z = torch.randn(n, 2, generator=g)
    return DataLoader(TensorDataset(real, z), batch_size=BATCH_SIZE, shuffle=False)


class TinyGAN(L.LightningModule):
    """Generator Linear(2,4)-Tanh-Linear(4,3), discriminator Linear(3,4)-LeakyReLU-Linear(4,1).

    configure_optimizers returns ``([opt_g, opt_d], [sched_g, sched_d])``: the generator
    optimizer is chosen by the class attribute ``G_OPT`` ("sgd": SGD momentum 0.9, "adam":
    Adam), the discriminator's is Adam; both schedulers are StepLR stepped once per batch.
    """

    G_OPT = "sgd"

    def __init__(self, lr_g: float = 0.05, lr_d: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
        self.discriminator = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 1))
        self.g_lrs: list[float] = []  # the generator lr each generator step used
        self.losses: list[tuple[float, float]] = []  # (loss_d, loss_g) per batch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        real, z = batch
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)

        fake = self.generator(z)
        loss_d = (F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), zeros))
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

        loss_g = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        self.g_lrs.append(opt_g.param_groups[0]["lr"])
        opt_g.step()

        sched_g.step()
        sched_d.step()
        self.losses.append((loss_d.item(), loss_g.item()))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        if self.G_OPT == "sgd":
            opt_g: torch.optim.Optimizer = torch.optim.SGD(
                self.generator.parameters(), lr=self.hparams.lr_g, momentum=0.9)
        elif self.G_OPT == "adam":
            opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr_g)
        else:
            raise ValueError(f"G_OPT must be 'sgd' or 'adam', not {self.G_OPT!r}")
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr_d,
                                 betas=(0.5, 0.999))
        sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=2, gamma=0.5)
        sched_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=1, gamma=0.9)
        return [opt_g, opt_d], [sched_g, sched_d]
