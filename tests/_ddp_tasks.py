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
