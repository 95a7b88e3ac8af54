"""Tasks for the training loop's DDP tests, importable by the spawned processes (they inherit sys.path)."""
import torch.distributed as dist

from person_retrieval.models.pretrain import ClipPretrainTask


class FailsOnRankOne(ClipPretrainTask):
    """The mini CLIP's pretraining, except that the second process raises at its first step."""

    def loss(self, model, batch, gather):
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("rank one's own error at its first step")
        return super().loss(model, batch, gather)


class AbortsOnRankOne(ClipPretrainTask):
    """The same, except that the second process dies of SIGABRT (as a C++ abort in gloo would kill it)."""

    def loss(self, model, batch, gather):
        if dist.is_initialized() and dist.get_rank() == 1:
            import os

            os.abort()
        return super().loss(model, batch, gather)


class AbortsAtExitOnRankOne(ClipPretrainTask):
    """The same, except that the second process trains to the end and then dies of SIGABRT in the
    interpreter's teardown (an exit hook stands for gloo's process group aborting as it is destroyed)."""

    def loss(self, model, batch, gather):
        if dist.is_initialized() and dist.get_rank() == 1 and not getattr(self, "_hooked", False):
            import atexit
            import os

            atexit.register(os.abort)
            self._hooked = True
        return super().loss(model, batch, gather)


def gather_gradient(rank: int, world: int, port: int, out: str) -> None:
    """One process of the gather test: the loss of the whole gathered batch, and this rank's gradient."""
    import os

    import torch

    from person_retrieval.train import _GatherWithGrad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = (torch.arange(3.0) + 10 * rank).requires_grad_()
    y = _GatherWithGrad.apply(x)
    (y ** 2 * torch.arange(3.0 * world)).sum().backward()
    torch.save({"y": y.detach(), "grad": x.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()



def fafa_killed_mid_epoch(**kwargs):
    """FAFA's task, except that the process SIGKILLs itself at the training step named by ``PR_KILL_AT_STEP``
    (unset: plain FAFA): a real crash in the middle of an epoch, nothing flushed, no Python clean-up."""
    import os
    import signal

    from person_retrieval.papers.fafa import FAFATask

    task = FAFATask(**kwargs)
    kill_at = os.environ.get("PR_KILL_AT_STEP")
    if kill_at is not None:
        loss, steps = task.loss, [0]

        def killing_loss(model, batch, gather):
            steps[0] += 1
            if steps[0] == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            return loss(model, batch, gather)

        task.loss = killing_loss
    return task


class LinearContrastive:
    """The smallest contrastive task: two linear maps of fixed random pairs, InfoNCE over the gathered batch. No
    BatchNorm, no dropout, no random masks: what the loop itself does to a run, and nothing else."""

    def __init__(self, n: int = 96, dim: int = 12, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.x, self.pid = torch.randn(n, dim, generator=g), torch.arange(n)
        self.y = self.x @ torch.randn(dim, dim, generator=g) + 0.5 * torch.randn(n, dim, generator=g)

    def build(self):
        import torch
        import torch.nn as nn

        class Pair(nn.Module):
            def __init__(self, dim):
                super().__init__()
                torch.manual_seed(0)
                self.a, self.b = nn.Linear(dim, 8), nn.Linear(dim, 8)

            def forward(self, x, y):
                return self.a(x), self.b(y)

        return Pair(self.x.shape[1])

    def train_data(self):
        return [{"x": self.x[i], "y": self.y[i], "pid": self.pid[i]} for i in range(len(self.x))]

    def loss(self, model, batch, gather):
        import torch.nn.functional as F

        from person_retrieval import losses

        a, b = model(batch["x"], batch["y"])
        loss = losses.itc_loss(F.normalize(gather(a), dim=-1), F.normalize(gather(b), dim=-1), gather(batch["pid"]), 10.0)
        return loss, {}

    def evaluate(self, model):
        import torch

        a, b = model(self.x, self.y)
        return {"R1": 100 * (a @ b.T).argmax(1).eq(torch.arange(len(a))).float().mean().item()}
