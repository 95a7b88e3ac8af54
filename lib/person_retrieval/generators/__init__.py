"""Person image generators (TIPS's SPG and IDPG, SynCPR's dual panel) on Flux transformers.

* :mod:`.flow`: rectified flow (loss, Euler sampler), image codecs, token positions, the conditionings;
* :mod:`.lora`: LoRA with TIPS's ``Delta W = beta * gamma * B A``, named adapters, save / load / export;
* :mod:`.sampling`: :class:`FlowGenerator`, the one front end (``generate``, ``spg``, ``idpg``, ``dual``);
* :mod:`.autoencoder`: the mini generator's latent space (a small autoencoder trained here);
* :mod:`.mini`: the mini generator trained here on the world, cached by scale and seed;
* :mod:`.flux`: FLUX.1-dev through diffusers' ``FluxPipeline``, TIPS's settings as defaults;
* :mod:`.weights`: where the FLUX.1-dev folder is (``resolve_flux``), for parameter checks;
* :mod:`.quality`: high-frequency energy, identity agreement, Frechet distance on mini-CLIP features.
"""
from .flow import Condition, PackedLatentCodec, PixelCodec, VaeCodec, dual_condition, euler_sample, flow_matching_loss, spg_condition
from .lora import add_lora, adapter, load_lora, save_lora, set_beta, use_adapter
from .mini import MINI_FLUX, mini_generators, target_set
from .sampling import FlowGenerator

__all__ = ["Condition", "FlowGenerator", "MINI_FLUX", "PackedLatentCodec", "PixelCodec", "VaeCodec", "add_lora", "adapter", "dual_condition",
           "euler_sample", "flow_matching_loss", "load_lora", "mini_generators", "save_lora", "set_beta", "spg_condition",
           "target_set", "use_adapter"]
