"""Generators: rectified flow, the conditionings, LoRA, the FLUX.1-dev path on a tiny config, the mini
generator end to end at tiny, and the quality measurements."""
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from person_retrieval.generators import flow, lora
from person_retrieval.generators.flow import Condition, PixelCodec


def tiny_transformer(in_channels=12, text_dim=32, seed=0, heads=2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=text_dim,
                                  axes_dims_rope=[4, 4, 8])


class HashText:
    """A deterministic stand-in text encoder: each character's embedding from a fixed table (the
    encoder interface only; the real ones are tested below and in test_backbone)."""

    def __init__(self, dim=32):
        self.table = torch.randn(256, dim, generator=torch.Generator().manual_seed(0))

    def encode(self, texts, length=None):
        n = length or max(1, max(len(t) for t in texts))
        seq = torch.zeros(len(texts), n, self.table.shape[1])
        for i, t in enumerate(texts):
            for j, ch in enumerate(t[:n]):
                seq[i, j] = self.table[ord(ch) % 256]
        return Condition(seq, seq.mean(1))


# ---------------------------------------------------------------------------------------------
def test_pixel_codec_round_trips_and_rejects_odd_sizes():
    codec = PixelCodec(4)
    x = torch.randint(0, 256, (2, 3, 16, 8), dtype=torch.uint8)
    tok = codec.encode(x)
    assert tok.shape == (2, 8, 48) and tok.min() >= -1 and tok.max() <= 1
    back = (codec.decode(tok, 16, 8) * 255).round().to(torch.uint8)
    assert torch.equal(back, x)
    # one token is one patch: token 1 of image 0 is rows 0-3, columns 4-7
    assert torch.allclose(tok[0, 1].reshape(3, 4, 4), x[0, :, 0:4, 4:8].float() / 255 * 2 - 1)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        codec.encode(torch.zeros(1, 3, 10, 8, dtype=torch.uint8))


def test_image_ids_give_each_token_its_row_column_and_image_index():
    ids = flow.image_ids((2, 3), index=1)
    assert ids.shape == (6, 3)
    assert ids[:, 0].eq(1).all()
    assert ids[4].tolist() == [1, 1, 1]  # row 1, column 1


def test_timesteps_run_from_noise_to_data_and_shift_towards_noise():
    t = flow.timesteps(4)
    assert t[0] == 1 and t[-1] == 0 and (t[:-1] > t[1:]).all()
    assert (flow.timesteps(4, shift=3.0)[1:-1] > t[1:-1]).all()
    with pytest.raises(ValueError, match="at least 1"):
        flow.timesteps(0)


def test_euler_sampler_lands_exactly_on_a_point_mass():
    """For data that is one point c the true velocity is (x - c) / t, and Euler steps on it are exact:
    the sampler must end on c whatever the step count and shift."""
    c = torch.randn(1, 6, 12)

    class PointMass(nn.Module):
        config = types.SimpleNamespace(guidance_embeds=False)

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, hidden_states, timestep, return_dict=False, **kw):
            return ((hidden_states - c) / timestep[:, None, None],)

    cond = Condition(torch.zeros(1, 3, 4), torch.zeros(1, 4))
    for steps, shift in ((1, 1.0), (3, 3.0), (7, 0.5)):
        x = flow.euler_sample(PointMass(), cond, (2, 3), 12, steps=steps, shift=shift, seed=5)
        assert torch.allclose(x, c, atol=1e-5)


def test_flow_matching_loss_is_taken_on_the_target_tokens_only():
    tr = tiny_transformer()
    x0, ref = torch.randn(2, 6, 12), torch.randn(2, 6, 12)
    cond = Condition(torch.randn(2, 5, 32), torch.randn(2, 32))
    got = flow.flow_matching_loss(tr, x0, cond, (2, 3), reference=ref, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, by hand
    noise = torch.randn(x0.shape, generator=g)
    t = torch.sigmoid(torch.randn(2, generator=g))
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    ids = torch.cat([flow.image_ids((2, 3), 0), flow.image_ids((2, 3), 1)])
    v = flow.velocity(tr, torch.cat([xt, ref], 1), cond, t, ids)
    assert v.shape[1] == 12
    assert torch.allclose(got, ((v[:, :6] - (noise - x0)) ** 2).mean(), atol=1e-6)
    # and the reference matters: the same target without it gives another loss
    other = flow.flow_matching_loss(tr, x0, cond, (2, 3), generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(got, other)


def test_sampling_is_deterministic_given_the_seed():
    tr = tiny_transformer().eval()
    cond, null = Condition(torch.randn(2, 5, 32), torch.randn(2, 32)), Condition(torch.zeros(1, 5, 32), torch.zeros(1, 32))
    a = flow.euler_sample(tr, cond, (2, 3), 12, steps=3, guidance_scale=2.0, null=null, seed=1)
    b = flow.euler_sample(tr, cond, (2, 3), 12, steps=3, guidance_scale=2.0, null=null, seed=1)
    c = flow.euler_sample(tr, cond, (2, 3), 12, steps=3, guidance_scale=2.0, null=null, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # v_u + g (v_c - v_u) is v_c when the unconditional input is the condition itself
    plain = flow.euler_sample(tr, cond, (2, 3), 12, steps=3, seed=1)
    for i in range(2):  # one batched call (same length) ...
        same = flow.euler_sample(tr, cond.index([i]), (2, 3), 12, steps=3, guidance_scale=4.0, null=cond.index([i]), seed=1)
        assert torch.allclose(same[0], flow.euler_sample(tr, cond.index([i]), (2, 3), 12, steps=3, seed=1)[0], atol=1e-5)
    short_null = Condition(torch.zeros(1, 4, 32), torch.zeros(1, 32))  # ... or two calls (another length)
    e = flow.euler_sample(tr, cond, (2, 3), 12, steps=3, guidance_scale=2.0, null=short_null, seed=1)
    assert e.shape == a.shape and torch.isfinite(e).all() and not torch.allclose(e, plain)


# ---------------------------------------------------------------------------------------------
def test_spg_condition_prefixes_the_size_and_a_dropped_size_is_the_empty_text():
    enc = HashText()
    c = flow.spg_condition(enc, ["a man", "a man"], [(32, 64), None])
    k = flow.SIZE_TOKENS + flow.SEP_TOKENS
    assert c.seq.shape == (2, k + 5, 32)
    assert torch.equal(c.seq[0, :flow.SIZE_TOKENS], enc.encode(["32, 64"], flow.SIZE_TOKENS).seq[0])
    assert torch.equal(c.seq[1, :flow.SIZE_TOKENS], enc.encode([""], flow.SIZE_TOKENS).seq[0])
    assert torch.equal(c.seq[0, k:], c.seq[1, k:])  # the prompt part is untouched
    assert torch.equal(c.pooled[0], enc.encode(["a man"]).pooled[0])
    assert flow.size_text((48, 96)) == "48, 96" and flow.size_text(None) == ""
    with pytest.raises(ValueError, match="positive width and height"):
        flow.size_text((0, 10))
    with pytest.raises(ValueError, match="2 prompts but 1 size"):
        flow.spg_condition(enc, ["a", "b"], [None])


def test_dual_condition_marks_each_panel():
    enc = HashText()
    c = flow.dual_condition(enc, ["red"], ["blue"])
    a, b = flow.dual_prompts(["red"], ["blue"])
    assert a == ["on the left: red"] and b == ["on the right: blue"]
    assert c.seq.shape[1] == len(a[0]) + len(b[0])
    fixed = flow.dual_condition(enc, [""], [""], lengths=(20, 21))
    assert fixed.seq.shape[1] == 41


# ---------------------------------------------------------------------------------------------
def _proj(tr):
    return tr.transformer_blocks[0].attn.to_q


def test_lora_starts_at_the_base_model_and_scales_with_beta_and_gamma():
    tr = tiny_transformer()
    x = torch.randn(3, 32)
    base = _proj(tr)(x).detach()
    n = lora.add_lora(tr, "spg", rank=4)
    assert n == 8 + 3  # a double block's 8 projections (image and text streams), a single block's q, k, v
    trainable = [k for k, p in tr.named_parameters() if p.requires_grad]
    assert trainable and all(".spg." in k and "lora_" in k for k in trainable)
    assert torch.allclose(_proj(tr)(x), base)  # B = 0 at the start
    with torch.no_grad():
        _proj(tr).lora_B["spg"].weight.normal_()
    d1 = _proj(tr)(x) - base
    lora.set_beta(tr, "spg", 2.0)
    assert torch.allclose(_proj(tr)(x) - base, 2 * d1, atol=1e-5)
    lora.set_beta(tr, "spg", 0.0)
    assert torch.allclose(_proj(tr)(x), base, atol=1e-6)
    lora.set_beta(tr, "spg", 1.0)
    with torch.no_grad():
        _proj(tr).lora_B["spg"].lora_gamma.fill_(0.5)
    assert torch.allclose(_proj(tr)(x) - base, 0.5 * d1, atol=1e-5)
    assert lora.gammas(tr, "spg")["transformer_blocks.0.attn.to_q"] == 0.5
    lora.use_adapter(tr, None)
    assert torch.allclose(_proj(tr)(x), base, atol=1e-6)
    with pytest.raises(KeyError, match="no adapter named 'idpg'"):
        lora.use_adapter(tr, "idpg")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.add_lora(tr, "x", rank=0)
    with pytest.raises(ValueError, match="already has an adapter named 'spg'"):
        lora.add_lora(tr, "spg", rank=2)


def test_gamma_learns():
    tr = tiny_transformer()
    lora.add_lora(tr, "spg", rank=2)
    with torch.no_grad():
        for m in tr.modules():
            if hasattr(m, "lora_B") and "spg" in m.lora_B:
                m.lora_B["spg"].weight.normal_()
    x = torch.randn(4, 32)
    _proj(tr)(x).pow(2).sum().backward()
    assert _proj(tr).lora_B["spg"].lora_gamma.grad is not None and _proj(tr).lora_B["spg"].lora_gamma.grad != 0


def test_lora_save_load_round_trip_and_mismatch_errors(tmp_path):
    tr = tiny_transformer()
    base_state = {k: v.clone() for k, v in tr.state_dict().items()}
    lora.add_lora(tr, "idpg", rank=4)
    with torch.no_grad():
        for m in tr.modules():
            if hasattr(m, "lora_B") and "idpg" in m.lora_B:
                m.lora_B["idpg"].weight.normal_()
                m.lora_B["idpg"].lora_gamma.fill_(0.7)
    f = lora.save_lora(tr, "idpg", tmp_path / "idpg.safetensors")
    fresh = tiny_transformer(seed=1)
    fresh.load_state_dict(base_state)
    lora.load_lora(fresh, f, "idpg")
    x = torch.randn(2, 32)
    assert torch.allclose(_proj(fresh)(x), _proj(tr)(x), atol=1e-6)
    assert lora.gammas(fresh, "idpg") == pytest.approx(lora.gammas(tr, "idpg"))
    # the same file under another name, beside it
    lora.load_lora(fresh, f, "idpg2")
    assert set(fresh.peft_config) == {"idpg", "idpg2"}
    with pytest.raises(ValueError, match="does not fit this transformer"):
        lora.load_lora(tiny_transformer(heads=4), f, "idpg")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA file written by save_lora"):
        lora.load_lora(tiny_transformer(), tmp_path / "other.safetensors", "x")
    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        lora.load_lora(tiny_transformer(), tmp_path / "missing.safetensors", "x")


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from person_retrieval.generators import flux

    d = tmp_path_factory.mktemp("flux")
    flux.tiny_flux_pipeline().save_pretrained(str(d))
    return d


def test_flux_path_loads_trains_a_lora_step_and_samples(tiny_flux):
    from person_retrieval.generators import flux

    pipe = flux.load_flux(tiny_flux, dtype=torch.float32)
    gen = flux.flux_generator(pipe, height=32, width=16, steps=2)
    assert gen.flux_guidance == 3.5 and gen.guidance == 1.0  # FLUX.1-dev's distilled guidance, no CFG pass
    for kind in ("spg", "idpg", "dual"):
        lora.add_lora(pipe.transformer, kind, rank=flux.TIPS_DEFAULTS["rank"] // 8)
    lora.use_adapter(pipe.transformer, "spg")
    opt = flux.lora_optimizer(pipe.transformer, lr=1e-2)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    imgs = torch.randint(0, 256, (2, 3, 32, 16), dtype=torch.uint8)
    loss = flux.lora_loss(gen, "spg", imgs, ["a man", "a woman"], sizes=[(16, 32), (8, 16)])
    loss.backward()
    opt.step()
    changed = {k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".spg." in k for k in changed)  # one step moved the SPG adapter, nothing else
    x = gen.spg(["a man"], (16, 32), seed=0)
    assert x.shape == (1, 3, 32, 16) and x.dtype == torch.uint8
    assert torch.equal(x, gen.spg(["a man"], (16, 32), seed=0))
    assert gen.idpg(x, ["seen from the back"]).shape == x.shape
    left, right = gen.dual(["a"], ["b"], beta=[0.7])
    assert left.shape == right.shape == (1, 3, 32, 16)
    for kind, kw in (("idpg", {"references": imgs}), ("dual", {"right": (imgs, ["c", "d"])})):
        assert torch.isfinite(flux.lora_loss(gen, kind, imgs, ["x", "y"], **kw))
    # FluxPipeline's own sampler from a size-prefixed condition
    z = flux.pipeline_sample(pipe, flow.spg_condition(gen.text, ["a man"], [(16, 32)]), height=32, width=16, steps=2)
    assert z.shape == (1, 3, 32, 16) and z.dtype == torch.uint8


def test_flux_lora_exports_to_diffusers_format_with_gamma_folded(tiny_flux, tmp_path):
    from diffusers import FluxPipeline

    from person_retrieval.generators import flux

    pipe = flux.load_flux(tiny_flux, dtype=torch.float32)
    lora.add_lora(pipe.transformer, "spg", rank=4)
    with torch.no_grad():
        for m in pipe.transformer.modules():
            if hasattr(m, "lora_B") and "spg" in m.lora_B:
                m.lora_B["spg"].weight.normal_(std=0.1)
                m.lora_B["spg"].lora_gamma.fill_(0.3)
    lora.use_adapter(pipe.transformer, "spg")
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=lora.diffusers_lora_state(pipe.transformer, "spg"))
    other = flux.load_flux(tiny_flux, dtype=torch.float32)
    other.load_lora_weights(str(tmp_path), adapter_name="spg")
    x = torch.randn(2, 32)
    ours, theirs = _proj(pipe.transformer)(x), _proj(other.transformer)(x)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, _proj(flux.load_flux(tiny_flux, dtype=torch.float32).transformer)(x))


def test_missing_flux_weights_say_where_to_put_them(tmp_path, monkeypatch):
    from person_retrieval.generators import flux

    monkeypatch.setenv("PR_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"put the diffusers-format FLUX.1-dev folder .* at .*FLUX.1-dev"):
        flux.load_flux("FLUX.1-dev")


# ---------------------------------------------------------------------------------------------
def test_high_frequency_energy_falls_with_blur():
    from person_retrieval.generators.quality import high_frequency_energy

    checker = (torch.arange(16)[:, None] + torch.arange(8)[None, :]) % 2 * 255
    flat = torch.full((16, 8), 128)
    imgs = torch.stack([checker, flat]).to(torch.uint8)[:, None].expand(-1, 3, -1, -1)
    e = high_frequency_energy(imgs)
    assert e[0] == pytest.approx(1.0) and e[1] == 0.0
    rng = np.random.default_rng(0)
    sharp = torch.from_numpy(rng.integers(0, 256, (1, 3, 32, 16))).to(torch.uint8)
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(sharp.float(), 4), scale_factor=4, mode="bilinear")
    assert high_frequency_energy(blurred.round().to(torch.uint8)) < 0.5 * high_frequency_energy(sharp)
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_energy(imgs, cutoff=0.6)


def test_frechet_distance_known_answers():
    from person_retrieval.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0])) == pytest.approx(5.0, abs=1e-6)
    # two 1-D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2
    b = torch.randn(20000, 1, generator=g) * 3 + 1
    c = torch.randn(20000, 1, generator=g)
    assert frechet_distance(b, c) == pytest.approx(1 + 4, rel=0.05)
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(a, torch.randn(5, 2))


def _tiny_codec(seed=0):
    from person_retrieval.generators.autoencoder import MiniAutoencoder, MiniLatentCodec

    torch.manual_seed(seed)
    return MiniLatentCodec(MiniAutoencoder(channels=4, width=8, factor=4, blocks=1), shift=0.3, scale=2.0)


def test_latent_codec_packs_2x2_and_decodes_what_the_autoencoder_draws():
    codec = _tiny_codec()
    x = torch.randint(0, 256, (2, 3, 32, 16), dtype=torch.uint8)
    tok = codec.encode(x)
    assert codec.channels == 16 and tok.shape == (2, 4 * 2, 16)  # 8x4 latents, 2x2 packed: a 4x2 grid
    z = codec.ae.encoder(x.float() / 255 * 2 - 1)
    # token 1 is latent rows 0-1, columns 2-3, shifted and scaled
    assert torch.allclose(tok[0, 1].reshape(4, 2, 2), (z[0, :, 0:2, 2:4] - 0.3) * 2.0, atol=1e-5)
    # packing and normalisation are undone exactly: decoding is the autoencoder's own reconstruction
    want = ((codec.ae(x.float() / 255 * 2 - 1) + 1) / 2).clamp(0, 1)
    assert torch.allclose(codec.decode(tok, 32, 16), want, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 8"):
        codec.encode(torch.zeros(1, 3, 36, 16, dtype=torch.uint8))


def test_latent_codec_save_load_round_trip_and_normalisation(tmp_path):
    from person_retrieval.generators.autoencoder import fitted_codec, load_codec, save_codec

    codec = _tiny_codec()
    x = torch.randint(0, 256, (64, 3, 32, 16), dtype=torch.uint8)
    fit = fitted_codec(codec.ae, x)
    tok = fit.encode(x)
    assert abs(float(tok.mean())) < 1e-3 and abs(float(tok.std()) - 1) < 1e-2  # FLUX's shift and scale, fitted
    back = load_codec(save_codec(fit, tmp_path / "ae.safetensors"))
    assert (back.shift, back.scale) == (fit.shift, fit.scale)
    assert torch.equal(back.encode(x), tok) and torch.equal(back.decode(tok, 32, 16), fit.decode(tok, 32, 16))
    with pytest.raises(FileNotFoundError, match="no autoencoder file"):
        load_codec(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an autoencoder"):
        load_codec(tmp_path / "other.safetensors")


def test_make_codec_needs_the_autoencoder_and_a_known_codec():
    from person_retrieval.generators.mini import make_codec, mini_config

    assert isinstance(make_codec(mini_config("tiny", {"codec": "pixel", "patch": 4})), PixelCodec)
    from person_retrieval.generators.mini import token_grid

    assert token_grid(mini_config("tiny", {"codec": "pixel", "patch": 4})) == PixelCodec(4).grid(64, 32)
    assert token_grid(mini_config("tiny")) == _tiny_codec().grid(64, 32) == (8, 4)
    with pytest.raises(ValueError, match="needs the trained autoencoder"):
        make_codec(mini_config("tiny"))
    with pytest.raises(ValueError, match="codec must be 'latent' or 'pixel'"):
        make_codec(mini_config("tiny", {"codec": "vq"}))


def test_autoencoder_decoder_upsamples_smoothly_and_needs_a_power_of_two():
    from person_retrieval.generators.autoencoder import MiniAutoencoder
    from person_retrieval.generators.quality import high_frequency_energy, through_codec

    for f in (2, 4, 8):
        ae = MiniAutoencoder(channels=4, width=16, factor=f, blocks=1)
        assert ae(torch.zeros(1, 3, 32, 16)).shape == (1, 3, 32, 16)
        assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in ae.modules())
    with pytest.raises(ValueError, match="power of two"):
        MiniAutoencoder(factor=3)
    # one latent pixel switched on: nearest upsampling and 3x3 convolutions spread it over its neighbours
    ae = MiniAutoencoder(channels=4, width=16, factor=4, blocks=1)
    z = torch.zeros(1, 4, 8, 4)
    z[0, :, 4, 2] = 3.0
    d = (ae.decoder(z) - ae.decoder(torch.zeros_like(z))).abs().sum(1)[0]
    assert d[14:18, 6:10].sum() > 0 and d[:, 5].sum() > 0 and d[:, 10].sum() > 0  # reaches past its own 4x4 patch
    x = torch.randint(0, 256, (3, 3, 16, 8), dtype=torch.uint8)
    assert torch.equal(through_codec(PixelCodec(4), x), x)  # the pixel codec is lossless
    assert high_frequency_energy(through_codec(PixelCodec(4), x)).shape == (3,)


def test_studio_partners_pair_views_of_one_person():
    from person_retrieval.generators.mini import mini_config, studio_partners

    cfg = mini_config("tiny")
    p = studio_partners(cfg)
    i = torch.arange(len(p))
    assert len(p) == cfg.studio_ids * cfg.studio_views and torch.all(p != i)
    assert torch.all(p // cfg.studio_views == i // cfg.studio_views)  # the same person
    assert cfg.studio_views == 2 and torch.equal(p[p], i)  # two views: each is the other's partner
    three = studio_partners(mini_config("tiny", {"studio_views": 3}))
    assert three[:6].tolist() == [1, 2, 0, 4, 5, 3]
    with pytest.raises(ValueError, match="at least 2 views"):
        studio_partners(mini_config("tiny", {"studio_views": 1}))


def test_studio_backdrops_change_the_background_only():
    from person_retrieval.generators.mini import mini_config, studio_backdrop, studio_set
    from person_retrieval.world import render, sample_person
    from person_retrieval.world.render import STUDIO, State

    rng = np.random.default_rng(0)
    bd = studio_backdrop(rng, 64, 32)
    walls = {tuple(bd[0, 0]), tuple(bd[-1, 0])}
    assert bd.shape == (64, 32, 3) and len(walls) == 2  # a wall and a floor, each one flat colour
    assert np.all(bd[:, 0] == bd[:, -1]) and 0 <= bd.min() and bd.max() <= 1
    person, st = sample_person(rng, 0), State(scene=STUDIO)
    plain, on = render(person, st, 64), render(person, st, 64, backdrop=bd)
    assert np.array_equal(on[0, 0], (bd[0, 0] * 255 + 0.5).astype(np.uint8))  # the corner is the backdrop
    body = np.abs(plain.astype(int) - 219).sum(-1) > 30  # the person's pixels in the grey studio
    assert body.sum() > 100 and np.array_equal(on[body], plain[body])  # the person is drawn as before
    with pytest.raises(ValueError, match="backdrop must be"):
        render(person, st, 64, backdrop=bd[:32])
    (x0, c0, s0), (x1, c1, s1) = (studio_set(mini_config("tiny", {"studio_ids": 6, "studio_backdrop_share": share}), 0, states=True)
                                  for share in (0.0, 1.0))
    assert c0 == c1 and s0 == s1  # the same people, states and captions: backdrops draw from their own stream
    corner = lambda x: x[:, :, 0, 0].float()
    assert torch.all(corner(x0) == corner(x0)[0]) and len({tuple(v) for v in corner(x1).tolist()}) > len(x1) // 2


def test_difference_text_says_what_changed_and_the_base_learns_it_beside_the_other_view(mini_gen, tiny_world):
    from dataclasses import replace

    from person_retrieval.generators.mini import GeneratorTask, difference_text, studio_partners, studio_set
    from person_retrieval.world.render import STUDIO, State

    a = State(pose="standing", view="front", facing=1, scene=STUDIO, brightness=1.0, cast=(1.0, 1.0, 1.0), res_factor=1)
    assert difference_text(a, a) == "the same person again"
    assert difference_text(a, replace(a, view="back", pose="walking")) == "the same person, seen from the back, walking"
    assert difference_text(a, replace(a, scene="park")) == "the same person, in a park"
    task = GeneratorTask("base", "tiny", 0, root=str(tiny_world["cuhk_pedes"]), autoencoder=mini_gen[1]["dir"] + "/autoencoder.safetensors")
    task._prepare()
    full = {k: torch.cat([task.val[k], task.train[k]]) for k in task.train}
    assert {"ref", "dseq", "dpooled"} <= set(full)
    assert full["dseq"].shape[1] == task.diff_null.seq.shape[1]
    x = task.codec.encode(studio_set(task.cfg, 0)[0])
    partner = studio_partners(task.cfg)
    i = int(torch.nonzero((full["x"][0] == x).flatten(1).all(1))[0])  # where the first kept item came from
    assert torch.equal(full["ref"][0], x[partner[i]])


def test_autoencoder_task_learns_to_reconstruct():
    from person_retrieval.generators.autoencoder import MiniAutoencoder
    from person_retrieval.generators.mini import AutoencoderTask

    task = AutoencoderTask.__new__(AutoencoderTask)  # the loss and evaluation, on a fixed image set
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(32, 3, 4, 2, generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3) * 2 - 1
    task.val = blocks[:8]
    torch.manual_seed(0)
    model = MiniAutoencoder(channels=4, width=16, factor=4, blocks=1)
    before = task.evaluate(model)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        loss, logs = task.loss(model, {"x": blocks}, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(model)
    assert after["psnr"] > before["psnr"] + 6 and after["neg_l1"] > before["neg_l1"]


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_gen():
    from person_retrieval.generators.mini import mini_generators

    return mini_generators("tiny", seed=0, progress=False)


def test_mini_generator_trains_every_stage_and_samples_deterministically(mini_gen):
    gen, report = mini_gen
    assert set(gen.adapters) == {"spg", "idpg", "dual"}
    assert all(report[k]["epochs"] >= 1 and np.isfinite(report[k]["val_loss"]) for k in ("base", "spg", "idpg", "dual"))
    assert report["autoencoder"]["epochs"] >= 1 and np.isfinite(report["autoencoder"]["val_psnr"])
    assert np.isfinite(report["base"]["val_ref_loss"])  # the base also learned IDPG's reference layout
    x = gen.spg(["a man in a red shirt"] * 2, [(32, 64), (8, 16)], seed=3)
    assert x.shape == (2, 3, 64, 32) and x.dtype == torch.uint8
    assert torch.equal(x, gen.spg(["a man in a red shirt"] * 2, [(32, 64), (8, 16)], seed=3))
    assert not torch.equal(x, gen.spg(["a man in a red shirt"] * 2, [(32, 64), (8, 16)], seed=4))
    y = gen.idpg(x, ["the same person, seen from the back"] * 2)
    assert y.shape == x.shape
    left, right = gen.dual(["a woman"] * 2, ["a woman walking"] * 2, beta=[0.5, 1.0])
    assert left.shape == right.shape == (2, 3, 64, 32)
    with pytest.raises(ValueError, match="must be 64x32"):
        gen.idpg(torch.zeros(1, 3, 32, 16, dtype=torch.uint8), ["x"])
    with pytest.raises(ValueError, match="2 left prompts but 1 right"):
        gen.dual(["a", "b"], ["c"])


def test_mini_generator_is_cached(mini_gen):
    from person_retrieval.generators.mini import mini_generators

    _, first = mini_gen
    _, again = mini_generators("tiny", seed=0, progress=False)
    assert again == first  # nothing retrained: the same report, same stage times
    gen, other = mini_generators("tiny", seed=0, progress=False, guidance=2.0, size_guidance=1.5, steps=3)
    assert other == first and (gen.guidance, gen.size_guidance, gen.steps) == (2.0, 1.5, 3)  # sampling settings retrain nothing


def test_spg_size_guidance_adds_a_term_on_the_size_alone(mini_gen, monkeypatch):
    from person_retrieval.generators import sampling

    gen, _ = mini_gen
    seen = {}
    real = sampling.euler_sample

    def spy(transformer, cond, *a, partial=None, partial_scale=0.0, **kw):
        seen["partial"], seen["scale"], seen["g"] = partial, partial_scale, kw["guidance_scale"]
        return real(transformer, cond, *a, partial=partial, partial_scale=partial_scale, **kw)

    monkeypatch.setattr(sampling, "euler_sample", spy)
    plain = gen.spg(["a man in a red shirt"] * 2, (8, 16), seed=1, size_guidance=0.0)
    assert seen["partial"] is None and seen["g"] == gen.spg_guidance == 1.5  # SPG's own guidance scale
    gen.idpg(plain, ["the same person again"] * 2)
    assert seen["g"] == gen.guidance == 3.0
    sharp = gen.spg(["a man in a red shirt"] * 2, (8, 16), seed=1, size_guidance=4.0)
    want = flow.spg_condition(gen.text, ["a man in a red shirt"] * 2, [None, None])
    assert seen["scale"] == 4.0 and torch.equal(seen["partial"].seq, want.seq)
    assert not torch.equal(plain, sharp)
    # the term is v_c - v_partial: with the full condition as the "partial" one it vanishes
    c = flow.spg_condition(gen.text, ["a man"], [(8, 16)])
    args = (gen.transformer, c, gen.codec.grid(*gen.image_size), gen.codec.channels)
    kw = dict(steps=3, guidance_scale=2.0, null=flow.spg_condition(gen.text, [""], [None]), seed=0, prediction=gen.prediction)
    assert torch.allclose(real(*args, **kw), real(*args, partial=c, partial_scale=5.0, **kw), atol=1e-5)


def test_beta_zero_is_the_base_model(mini_gen):
    gen, _ = mini_gen
    a = gen.generate(["a man"], seed=1)
    b = gen.generate(["a man"], seed=1, adapter="spg", beta=0.0)
    c = gen.generate(["a man"], seed=1, adapter="spg", beta=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_target_set_sizes_and_difference_prompts(tiny_world):
    from person_retrieval.generators.mini import MINI_FLUX, original_sizes, target_set
    from person_retrieval.world.build import read_world_meta

    cfg = MINI_FLUX["tiny"]
    ts = target_set("cuhk_pedes", tiny_world["cuhk_pedes"], cfg, seed=0)
    assert len(ts.images) == cfg.target_ids * cfg.images_per_id and ts.images.shape[-2:] == cfg.image_size
    meta = {r["path"]: r["state"]["res_factor"] for r in read_world_meta(tiny_world["cuhk_pedes"])["images"]}
    factors = [meta[p.split("/", 1)[1]] for p in ts.paths]  # the sidecar's paths are under imgs/
    assert ts.sizes == [(32 // f, 64 // f) for f in factors]  # the size the camera saw
    assert len(set(factors)) > 1
    assert all(a != b and ts.pids[a] == ts.pids[b] for a, b in ts.pairs())
    assert original_sizes(tiny_world["cuhk_pedes"], ts.paths[:1]) == ts.sizes[:1]
    big = type(cfg)(**{**cfg.__dict__, "target_ids": 10**6})
    with pytest.raises(ValueError, match="needs 1000000"):
        target_set("cuhk_pedes", tiny_world["cuhk_pedes"], big, seed=0)


def test_generator_task_rejects_an_unknown_stage():
    from person_retrieval.generators.mini import GeneratorTask, mini_generators

    with pytest.raises(ValueError, match="unknown generator stage 'spgg'"):
        GeneratorTask("spgg", "tiny")
    with pytest.raises(ValueError, match="stages must include 'base'"):
        mini_generators("tiny", stages=("spg",))


def test_flux_lora_training_loop_on_a_few_shot_set(tiny_flux, tiny_world, tmp_path):
    from person_retrieval.generators import flux
    from person_retrieval.generators.mini import MINI_FLUX, target_set

    pipe = flux.load_flux(tiny_flux, dtype=torch.float32)
    gen = flux.flux_generator(pipe, height=32, width=16, steps=2)
    cfg = type(MINI_FLUX["tiny"])(**{**MINI_FLUX["tiny"].__dict__, "image_size": (32, 16)})
    ts = target_set("cuhk_pedes", tiny_world["cuhk_pedes"], cfg, seed=0)
    for kind in ("spg", "idpg", "dual"):
        hist = flux.train_flux_lora(gen, kind, ts, steps=2, rank=2, lr=1e-3, out_file=tmp_path / f"{kind}.safetensors", progress=False)
        assert len(hist) == 2 and all(np.isfinite(hist))
        assert (tmp_path / f"{kind}.safetensors").is_file()
    assert set(gen.adapters) == {"spg", "idpg", "dual"}


def test_number_tokens_tell_sizes_apart_and_a_dropped_size_is_the_null():
    null = torch.randn(1, flow.SIZE_TOKENS, 32)
    t = flow.number_tokens([(64, 128), (16, 32), None], 32, null, scale=10.0)
    assert t.shape == (3, flow.SIZE_TOKENS, 32)
    assert torch.allclose(t[0, 0].norm(), torch.tensor(10.0)) and torch.allclose(t[0, 1].norm(), torch.tensor(10.0))
    assert torch.equal(t[2], null[0]) and torch.equal(t[0, 2::2], t[0, 0:1].expand(3, -1))  # every slot: w, h, w, h, ...
    assert not torch.equal(t[0, 0], t[0, 1])
    cos = torch.nn.functional.cosine_similarity(t[0, :2].flatten(), t[1, :2].flatten(), 0)
    assert cos < 0.9  # unlike the mini CLIP's own encodings of the digits (0.99)
    # smooth in log-size: a size is closer to its neighbour than to a size four times smaller
    null = torch.zeros(1, flow.SIZE_TOKENS, 128)
    s = flow.number_tokens([(64, 128), (32, 64), (16, 32)], 128, null, scale=1.0)[:, 0]
    near, far = float(s[0] @ s[1]), float(s[0] @ s[2])
    assert near > 0.25 and near > far + 0.1
    with pytest.raises(ValueError, match="positive width"):
        flow.number_tokens([(0, 5)], 32, null, 1.0)


def test_spg_condition_uses_an_encoders_own_size_tokens(mini_gen):
    gen, _ = mini_gen
    c = flow.spg_condition(gen.text, ["a man", "a man"], [(32, 64), None])
    k = flow.SIZE_TOKENS
    assert torch.equal(c.seq[:, :k], gen.text.encode_sizes([(32, 64), None]))
    assert torch.equal(c.seq[1, :k], gen.text.encode([""], k).seq[0])


def test_falls_significantly_needs_a_real_drop_at_every_step():
    from person_retrieval.generators.quality import falls_significantly

    g = torch.Generator().manual_seed(0)
    sharp = torch.randint(0, 256, (12, 3, 16, 8), generator=g).to(torch.uint8)

    def blur(x, k):
        y = torch.nn.functional.avg_pool2d(x.float(), k)
        return torch.nn.functional.interpolate(y, scale_factor=k, mode="nearest").round().to(torch.uint8)

    assert falls_significantly([sharp, blur(sharp, 2), blur(sharp, 4)])
    assert not falls_significantly([sharp, sharp, blur(sharp, 4)])  # no drop at the first step
    assert not falls_significantly([blur(sharp, 4), sharp])


def test_spg_guidance_is_against_the_empty_prompt_and_a_per_sample_null_is_indexed(mini_gen, monkeypatch):
    """SPG's training drops the whole prompt for 10%: guidance's other branch is the empty prompt, no size."""
    from person_retrieval.generators import sampling
    from person_retrieval.generators.flow import spg_condition

    gen, _ = mini_gen
    seen = {}
    real = sampling.euler_sample

    def spy(transformer, cond, *a, null=None, **kw):
        seen["cond"], seen["null"] = cond, null
        return real(transformer, cond, *a, null=null, **kw)

    monkeypatch.setattr(sampling, "euler_sample", spy)
    gen.spg(["a man in a red shirt", "a woman"], (32, 64), seed=0)
    want = spg_condition(gen.text, [""], [None])
    assert torch.equal(seen["null"].seq, want.seq) and torch.equal(seen["null"].pooled, want.pooled)
    # a per-sample unconditional input follows its sample into each batch
    cond = spg_condition(gen.text, ["a man in a red shirt", "a woman"], [(32, 64)] * 2)
    null = spg_condition(gen.text, ["a man in a red shirt", "a woman"], [None] * 2)
    monkeypatch.setattr(gen, "batch", 1)
    gen._run(cond, null, gen.image_size, 0, "spg", 1.0)
    assert torch.equal(seen["null"].seq, null.seq[1:]) and torch.equal(seen["cond"].seq, cond.seq[1:])
    with pytest.raises(ValueError, match="3 unconditional inputs for 2 samples"):
        gen._run(cond, Condition.cat([null, null.index([0])]), gen.image_size, 0, "spg", 1.0)


def test_spg_training_drops_the_size_and_sometimes_the_whole_prompt(mini_gen, tiny_world):
    from person_retrieval.generators.flow import SEP_TOKENS, SIZE_TOKENS
    from person_retrieval.generators.mini import GeneratorTask, smaller_captures, target_set

    task = GeneratorTask("spg", "tiny", 0, base="unused", root=str(tiny_world["cuhk_pedes"]),
                         autoencoder=mini_gen[1]["dir"] + "/autoencoder.safetensors")
    data = task.train_data()
    ts = target_set("cuhk_pedes", tiny_world["cuhk_pedes"], task.cfg, 0)
    extra, src, sizes = smaller_captures(tiny_world["cuhk_pedes"], ts, task.cfg.image_size)
    assert len(extra) == len(src) == len(sizes) > 0 and extra.shape[1:] == ts.images.shape[1:]
    assert all(s[0] < ts.sizes[i][0] for i, s in zip(src, sizes))  # only ever smaller than the source
    batch = data.batch(range(len(data)))
    k, k0 = SIZE_TOKENS, SIZE_TOKENS + SEP_TOKENS
    g = torch.Generator().manual_seed(0)
    no_size = no_prompt = n = 0
    for _ in range(40):
        c = task._condition(batch, drop=True, generator=g)
        size_null = (c.seq[:, :k] == task.prefix_null).flatten(1).all(1)
        prompt_null = (c.seq[:, k0:] == task.prompt_null.seq).flatten(1).all(1)
        assert torch.all(size_null[prompt_null])  # a dropped prompt never keeps its size
        assert torch.equal(c.seq[:, k:k0], batch["seq"][:, k:k0])  # the separator stays
        no_size, no_prompt, n = no_size + int(size_null.sum()), no_prompt + int(prompt_null.sum()), n + len(size_null)
    assert 0.22 < no_size / n < 0.34 and 0.06 < no_prompt / n < 0.14  # 20% size, plus 10% of everything


def test_training_batches_are_cut_to_their_longest_text_exactly(mini_gen, tiny_world):
    from person_retrieval.generators.mini import GeneratorTask, _Batches, mini_text_encoder
    from person_retrieval.train import epoch_order

    toy = _Batches(trim={"s": (torch.tensor([2, 5, 1, 3]), 1)}, s=torch.arange(28).view(4, 7), y=torch.arange(4))
    assert toy.batch([0, 2])["s"].shape == (2, 3) and toy.batch([1, 3])["s"].shape == (2, 6)
    assert torch.equal(toy.batch([0, 2])["s"], torch.tensor([[0, 1, 2], [14, 15, 16]])) and torch.equal(toy.lengths, torch.tensor([2, 5, 1, 3]))
    # cutting the padding is exact: the text encoder is causal
    text = mini_text_encoder("tiny", 0, tokens="sequence")
    caps = ["a man in a red coat", "a woman with a long blue skirt and a black bag on her shoulder"]
    n = int((text.backbone.tokenize(caps) != 0).sum(1).max())
    assert torch.allclose(text.encode(caps, n + 9).seq[:, :n], text.encode(caps, n).seq, atol=1e-5)
    task = GeneratorTask("base", "tiny", 0, root=str(tiny_world["cuhk_pedes"]), autoencoder=mini_gen[1]["dir"] + "/autoencoder.safetensors",
                         overrides={"text_tokens": "sequence"})
    data = task.train_data()
    order = epoch_order(len(data), 0, 0, data.lengths, 8)
    batch = data.batch(order[:8])
    assert batch["seq"].shape[1] == int(data.lengths[order[:8]].max()) <= data.t["seq"].shape[1]
    assert batch["dseq"].shape[1] == int(data.trim["dseq"][0][order[:8]].max())
    c = task._condition(batch, drop=True, generator=torch.Generator().manual_seed(3))
    assert c.seq.shape == batch["seq"].shape  # the empty prompt is cut with the batch
    dropped = ~(c.seq == batch["seq"]).flatten(1).all(1)
    assert torch.allclose(c.seq[dropped], text.encode([""], batch["seq"].shape[1]).seq.expand(int(dropped.sum()), -1, -1), atol=1e-5)


def test_reference_guidance_is_a_linear_term_on_the_reference_image(mini_gen):
    gen, _ = mini_gen
    grid, ch = gen.codec.grid(*gen.image_size), gen.codec.channels
    ref = torch.randn(1, grid[0] * grid[1], ch, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=1, guidance_scale=3.0, null=gen.text.encode([""]), reference=ref, seed=0, prediction=gen.prediction)
    out = {r: flow.euler_sample(gen.transformer, gen.text.encode(["the same person, seen from the back"]), grid, ch,
                                reference_scale=r, **kw) for r in (0.0, 1.0, 2.0)}
    # one Euler step: x1 = x0 + dt (v_u + g (v_c - v_u) + r (v_u - v_u without the reference)), affine in r
    assert torch.allclose(out[0.0], flow.euler_sample(gen.transformer, gen.text.encode(["the same person, seen from the back"]),
                                                      grid, ch, **kw))
    step = out[1.0] - out[0.0]
    assert step.abs().max() > 1e-4 and torch.allclose(out[2.0] - out[0.0], 2 * step, atol=1e-5)
    with pytest.raises(ValueError, match="needs a reference, a null condition"):
        flow.euler_sample(gen.transformer, gen.text.encode(["x"]), grid, ch, **{**kw, "reference": None}, reference_scale=1.0)
    # the generator passes its own scale, or the caller's
    imgs = gen.spg(["a man in a red shirt"], (8, 16), seed=1)
    assert gen.reference_guidance == 4.0
    assert not torch.equal(gen.idpg(imgs, ["seen from the back"]), gen.idpg(imgs, ["seen from the back"], reference_guidance=0.0))


def test_idpg_training_drops_the_reference_for_a_tenth_of_batches(mini_gen, tiny_world, monkeypatch):
    from person_retrieval.generators import mini

    task = mini.GeneratorTask("idpg", "tiny", 0, base="unused", root=str(tiny_world["cuhk_pedes"]),
                              autoencoder=mini_gen[1]["dir"] + "/autoencoder.safetensors")
    batch = task.train_data().batch(range(4))
    refs = []
    monkeypatch.setattr(mini, "flow_matching_loss", lambda model, x, cond, grid, reference=None, **kw: refs.append(reference))
    torch.manual_seed(0)
    for _ in range(400):
        task.loss(None, batch, None)
    kept = [r for r in refs if r is not None]
    assert 0.06 < 1 - len(kept) / len(refs) < 0.14 and all(torch.equal(r, batch["ref"]) for r in kept)


# ---------------------------------------------------------------------------------------------
# Issue 41: the paper path of notebook 02_generators and the LoRAs notebooks 02_tips and 03 read
def _tiny_flux_gen(tiny_flux, steps=2):
    from person_retrieval.generators import flux

    pipe = flux.load_flux(tiny_flux, dtype=torch.float32)
    return pipe, flux.flux_generator(pipe, height=32, width=16, steps=steps)


def _random_target(n_ids=3, per_id=2, seed=0):
    from person_retrieval.generators.mini import TargetSet

    g = torch.Generator().manual_seed(seed)
    n = n_ids * per_id
    return TargetSet(images=torch.randint(0, 256, (n, 3, 32, 16), generator=g, dtype=torch.uint8), pids=[i // per_id for i in range(n)],
                     captions=[[f"a person number {i // per_id} ."] for i in range(n)], sizes=[(16, 32), (8, 16)] * (n // 2),
                     paths=[f"{i}.jpg" for i in range(n)])


def test_flow_path_figure_decodes_through_a_vae_whose_weights_require_grad():
    """02_generators at paper: after the LoRAs trained, the flow-path figure failed with "Can't call numpy() on
    Tensor that requires grad" (FLUX.1-dev's VAE as built keeps requires_grad): it now decodes without grad."""
    from person_retrieval.generators import flux, lora, quality

    pipe = flux.tiny_flux_pipeline()
    assert any(p.requires_grad for p in pipe.vae.parameters())
    lora.add_lora(pipe.transformer, "spg", rank=2)
    gen = flux.flux_generator(pipe, height=32, width=16, steps=2)
    path = quality.flow_path(gen, torch.randint(0, 256, (1, 3, 32, 16), dtype=torch.uint8), (0.0, 0.5, 1.0))
    assert len(path) == 3 and all(isinstance(p, np.ndarray) and p.shape == (32, 16, 3) and p.dtype == np.uint8 for p in path)
    assert not np.array_equal(path[0], path[2])
    real = quality.through_codec(gen.codec, torch.randint(0, 256, (2, 3, 32, 16), dtype=torch.uint8))
    assert not real.requires_grad and real.numpy().shape == (2, 3, 32, 16)


def test_lora_training_honours_max_steps(tiny_flux, tmp_path):
    """max_steps caps the FLUX LoRA steps as it caps every train.fit run, and the capped adapters are saved
    apart from a full run's (a -steps<N> folder)."""
    from person_retrieval import train
    from person_retrieval.generators import flux

    _, gen = _tiny_flux_gen(tiny_flux)
    try:
        train.set_limits(max_steps=3)
        hist = flux.train_flux_lora(gen, "spg", _random_target(), steps=50, rank=2, progress=False)
        assert len(hist) == 3
        assert flux.lora_folder("cuhk_pedes", 0, 32, steps=50).name == "flux-cuhk_pedes-seed0-r32-steps3"
    finally:
        train.set_limits()
    assert flux.lora_folder("cuhk_pedes", 0, 32).name == "flux-cuhk_pedes-seed0-r32"
    assert not any(p.requires_grad for p in gen.transformer.parameters())  # trained: sampling and figures carry no grad


def test_lora_folder_is_found_for_any_rank_and_the_rank_read_from_the_files(tiny_flux, tmp_path, monkeypatch):
    """02_generators with rank 4 saves under ...-r4; 02_tips and 03 looked under ...-r32 only ("run
    02_generators"). They find the folder whatever its rank and load the adapters at the rank saved."""
    from person_retrieval.generators import flux, lora

    monkeypatch.setenv("PR_CACHE_DIR", str(tmp_path))
    pipe, gen = _tiny_flux_gen(tiny_flux)
    folder = flux.lora_folder("cuhk_pedes", 0, 4)
    assert folder.name == "flux-cuhk_pedes-seed0-r4"
    for kind in ("spg", "idpg"):
        flux.train_flux_lora(gen, kind, _random_target(), steps=1, rank=4, out_file=folder / f"{kind}.safetensors", progress=False)
    assert flux.find_lora_folder("cuhk_pedes", 0, ("spg", "idpg")) == folder
    assert flux.find_lora_folder("cuhk_pedes", 0, ("spg", "idpg"), rank=32) is None
    assert flux.find_lora_folder("cuhk_pedes", 0, ("dual",)) is None
    assert flux.find_lora_folder("cuhk_pedes", 1, ("spg",)) is None
    fresh, fresh_gen = _tiny_flux_gen(tiny_flux)
    said = []
    got, trained = flux.flux_loras(fresh, fresh_gen, "cuhk_pedes", None, 0, ("spg", "idpg"), log=said.append, progress=False)
    assert got == folder and trained == {} and said == []
    assert {m.r["spg"] for _, m in lora._lora_layers(fresh.transformer, "spg")} == {4}


def test_pooled_text_tokens_are_one_token_a_text(mini_gen, tiny_world):
    """The default: a caption enters the joint attention as one token, its pooled vector; SPG's size prefix
    and separator keep their slots, a dual canvas has one token a panel, and batches are one token long."""
    from person_retrieval.generators.mini import GeneratorTask, mini_config, mini_text_encoder

    assert mini_config("small").text_tokens == "pooled"
    with pytest.raises(ValueError, match="text_tokens must be one of"):
        mini_text_encoder("tiny", 0, tokens="words")
    text, seq_text = mini_text_encoder("tiny", 0), mini_text_encoder("tiny", 0, tokens="sequence")
    caps = ["a man in a red coat", "a woman with a long blue skirt and a black bag on her shoulder"]
    c, s = text.encode(caps), seq_text.encode(caps)
    assert c.seq.shape == (2, 1, text.dim) and torch.allclose(c.seq[:, 0], c.pooled) and torch.allclose(c.pooled, s.pooled, atol=1e-5)
    three = text.encode(caps, 3).seq
    assert three.shape == (2, 3, text.dim) and torch.equal(three[:, 2], c.pooled)  # a fixed length repeats it
    assert torch.equal(text.token_counts(caps), torch.ones(2, dtype=torch.long))
    spg = flow.spg_condition(text, caps, [(16, 32), None])
    assert spg.seq.shape[1] == flow.SIZE_TOKENS + flow.SEP_TOKENS + 1 and torch.allclose(spg.seq[:, -1], c.pooled)
    assert flow.dual_condition(text, caps, caps[::-1]).seq.shape[1] == 2
    task = GeneratorTask("base", "tiny", 0, root=str(tiny_world["cuhk_pedes"]), autoencoder=mini_gen[1]["dir"] + "/autoencoder.safetensors")
    data = task.train_data()
    assert data.t["seq"].shape[1] == 1 and int(data.lengths.max()) == 1 and data.batch([0, 1, 2])["seq"].shape[1] == 1


def test_read_back_counts_the_stated_slots_read_in_the_image():
    """Per slot, the share of the prompts stating it whose true value is read: a recognizer that reads the
    truth scores 100, one that reads another value 0, and slots no prompt states are left out."""
    from person_retrieval.generators import quality
    from person_retrieval.world.labels import HEADS

    held = quality.HeldOutPrompts(3, 12, (64, 32))
    again = quality.HeldOutPrompts(3, 12, (64, 32))
    assert held.texts == again.texts and torch.equal(held.renders, again.renders)  # fixed prompts
    assert held.renders.shape == (12, 3, 64, 32) and held.renders.dtype == torch.uint8
    assert all("gender" in m for m in held.mentioned) and any("upper_color" in m for m in held.mentioned)
    with pytest.raises(ValueError, match="n must be at least 1"):
        quality.HeldOutPrompts(0, 0, (64, 32))

    class Reader:
        def __init__(self, shift):
            self.shift = shift

        def predict(self, images):
            return {h: torch.nn.functional.one_hot(torch.tensor([(held.truth[i].get(h, 0) + self.shift) % len(v) for i in range(len(images))]),
                                                   len(v)).float() for h, v in HEADS.items()}

    right, wrong = quality.read_back(Reader(0), held.renders, held), quality.read_back(Reader(1), held.renders, held)
    for s in quality.READBACK_SLOTS:
        k = sum(s in m for m in held.mentioned)
        assert (s in right) == (k > 0)
        if k:
            assert right[s] == (100.0, k) and wrong[s] == (0.0, k)
    with pytest.raises(ValueError, match="images for 12 prompts"):
        quality.read_back(Reader(0), held.renders[:3], held)

    class Judge:
        def score(self, images, criterion, texts=None, references=None):
            return [10 if texts is not None else 9] * len(images)  # alignment 10, quality 9: all pass TIPS's bar

    table = quality.readback_table(Reader(0), Judge(), {"renders": held.renders, "half": held.renders}, held)
    assert set(table["images"]) == {"renders", "half"} and (table["read_back"] == 100.0).all()
    row = table[table["slot"] == "gender"].iloc[0]
    assert row["chance"] == pytest.approx(100 / len(HEADS["gender"])) and row["prompts"] == 12
    assert row["TIPS alignment"] == 10 and row["TIPS quality"] == 9 and row["SynCPR naturalness"] == 9 and row["TIPS seed filter passed"] == 100.0


def test_a_killed_generator_build_resumes_where_it_stopped(tiny_world, monkeypatch, tmp_path):
    """Killed between stages (after the autoencoder, the base and SPG), the build keeps what it finished and the
    next call trains only the rest, ending with the weights of a build that never stopped (a kill inside a
    stage resumes from that stage's last epoch: test_train's resume tests)."""
    from person_retrieval.generators import mini

    monkeypatch.setattr(mini, "cache_dir", lambda: tmp_path / "whole")
    whole, _ = mini.mini_generators("tiny", 0, progress=False)
    monkeypatch.setattr(mini, "cache_dir", lambda: tmp_path / "killed")
    real, trained, kill = mini._fit_stage, [], [True]

    def dies_at_idpg(kind, *a, **k):
        if kind == "idpg" and kill[0]:
            raise KeyboardInterrupt
        trained.append(kind)
        return real(kind, *a, **k)

    monkeypatch.setattr(mini, "_fit_stage", dies_at_idpg)
    with pytest.raises(KeyboardInterrupt):
        mini.mini_generators("tiny", 0, progress=False)
    (d,) = (tmp_path / "killed" / "models").iterdir()
    assert [f.name for f in sorted(d.glob("*.safetensors"))] == ["autoencoder.safetensors", "base.safetensors", "spg.safetensors"]
    trained.clear()
    kill[0] = False
    again, report = mini.mini_generators("tiny", 0, progress=False)
    assert trained == ["idpg", "dual"] and {"base", "spg", "idpg", "dual"} <= set(report)
    a, b = whole.transformer.state_dict(), again.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
