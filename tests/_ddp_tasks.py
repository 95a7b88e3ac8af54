"""Tasks for the training loop's DDP tests, importable by the spawned processes (they inherit sys.path)."""
import torch.distributed as dist

from person_retrieval.models.pretrain import ClipPretrainTask


class FailsOnRankOne(ClipPretrainTask):
    """The mini CLIP's pretraining, except that the second process raises at its first step."""

    def loss(self, model, batch, gather):
        if dist.is_initialized() and dist.get_rank() == 1:
            raise RuntimeError("rank one's own error at its first step")
        return super().loss(model, batch, gather)
