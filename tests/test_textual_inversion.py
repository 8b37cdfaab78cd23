"""Textual Inversion: only the new vectors learn, the frozen model never changes, resume is exact."""
import numpy as np
import pytest
import torch

from inversion.textual_inversion import TIConfig, TextualInversion
from inversion.trainer import TrainingError

TEMPLATES = ["a photo of a {}", "a rendering of a {}"]


def make(model, images, tmp_path, **kw):
    cfg = TIConfig(**{**dict(placeholder="<x>", init_word="object", steps=6, batch=2, save_every=3), **kw})
    return TextualInversion(model, images, cfg, tmp_path, TEMPLATES, log=lambda s: None)


def test_only_the_new_vectors_learn_and_the_model_stays_bit_identical(model, images, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = make(model, images, tmp_path)
    start = t.embedding()
    loss = t.loss(0)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert t.learned.vectors[0].grad is not None and t.learned.vectors[0].grad.abs().sum() > 0
    optimized = t.optimizer.params
    assert len(optimized) == 1 and optimized[0] is t.learned.vectors[0]
    t.run(progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(t.embedding(), start)
    assert t.step == 6 and len(t.losses) == 6
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "loss.csv").read_text().count("\n") == 7


def test_embedding_table_is_not_resized(model, images, tmp_path):
    table = model.text_encoder.text_model.embeddings.token_embedding.weight
    rows = table.shape[0]
    t = make(model, images, tmp_path, num_vectors=3)
    now = model.text_encoder.text_model.embeddings.token_embedding.weight  # re-read: not swapped for a larger one
    assert now is table and now.shape[0] == rows and not now.requires_grad
    assert t.embedding().shape == (3, 32)
    assert t.learned.ids(["a <x>"])[0, 2:6].tolist() == t.learned.token_ids("<x>") + [49407]


def test_the_vectors_are_used_in_the_text_encoding(model, images, tmp_path):
    t = make(model, images, tmp_path)
    ids = t.learned.ids(["a photo of a <x>"])
    a = model.text_encoder(ids, t.learned.mapping())
    with torch.no_grad():
        t.learned.vectors[0].add_(1.0)
    b = model.text_encoder(ids, t.learned.mapping())
    assert not torch.allclose(a, b)
    # tokens before the placeholder cannot see it (causal attention)
    assert torch.equal(a[:, :5], b[:, :5])


def test_resume_is_bit_identical(model, images, tmp_path):
    full = make(model, images, tmp_path / "full")
    full.run(progress=False)

    first = make(model, images, tmp_path / "split", steps=6)
    first.cfg.steps = 3  # stop half way, as an interrupted run would
    first.run(progress=False)
    first.cfg.steps = 6
    second = make(model, images, tmp_path / "split")
    assert second.resume() and second.step == 3
    second.run(progress=False)
    assert torch.equal(second.embedding(), full.embedding())
    assert second.losses == full.losses


def test_resume_with_other_settings_is_refused(model, images, tmp_path):
    make(model, images, tmp_path).run(progress=False)
    other = make(model, images, tmp_path, reg_weight=0.1)
    with pytest.raises(TrainingError, match=r"does not match this run \(--reg-weight 0.0 in the checkpoint, 0.1 now\)"):
        other.resume()
    brighter = make(model, (images + 0.1).clamp(-1, 1), tmp_path)
    with pytest.raises(TrainingError, match=r"does not match this run \(other images\)"):
        brighter.resume()


def test_progressive_extension_adds_vectors(model, images, tmp_path):
    t = make(model, images, tmp_path, num_vectors=3, progressive_every=2)
    words = lambda: t.prompts(np.random.default_rng(0), np.array([0]))[0].split()
    assert "<x>" in words() and "<x>_1" not in words()   # the prompts hold only the active vectors
    t.run(progress=False)
    assert t.active == 3 and t.embedding().shape == (3, 32)
    assert "<x>_1" in words() and "<x>_2" in words()
    t2 = make(model, images, tmp_path / "b", num_vectors=3, progressive_every=4)
    t2.run(progress=False)
    assert t2.active == 2


def test_regularization_keeps_the_vector_near_its_init(model, images, tmp_path):
    free = make(model, images, tmp_path / "free", lr=0.05)
    free.run(progress=False)
    tied = make(model, images, tmp_path / "tied", lr=0.05, reg_weight=100.0)
    tied.run(progress=False)
    init = tied.init_vector.cpu()
    assert (tied.embedding() - init).norm() < (free.embedding() - init).norm()


def test_per_image_tokens_appear_in_prompts(model, images, tmp_path):
    t = make(model, images, tmp_path, per_image_tokens=True, per_image_prob=1.0)
    import numpy as np
    prompts = t.prompts(np.random.default_rng(0), np.array([0, 2]))
    assert prompts[0].endswith("with <x>-img0") and prompts[1].endswith("with <x>-img2")
    assert len(t.learned.words) == 4
    t.run(progress=False)


def test_nan_loss_skips_the_step(model, images, tmp_path, monkeypatch):
    t = make(model, images, tmp_path)
    start = t.embedding()
    messages = []
    t.log = messages.append
    monkeypatch.setattr(t, "loss", lambda step: torch.tensor(float("nan"), requires_grad=True))
    assert t.train_step() is None
    assert torch.equal(t.embedding(), start) and "skipped" in messages[0]


def test_bad_words_are_refused(model, images, tmp_path):
    with pytest.raises(TrainingError, match="one token"):
        make(model, images, tmp_path).__class__(model, images, TIConfig(init_word="xylophonist bananas"),
                                                tmp_path, TEMPLATES)
    with pytest.raises(TrainingError, match="already a word"):
        TextualInversion(model, images, TIConfig(placeholder="cat"), tmp_path, TEMPLATES)


def test_ctrl_c_saves_what_was_learned(model, images, tmp_path, monkeypatch):
    t = make(model, images, tmp_path, steps=100, save_every=1000)
    saved = []
    real_step = t.train_step

    def step_then_interrupt():
        if t.step == 4:
            raise KeyboardInterrupt
        return real_step()
    monkeypatch.setattr(t, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        t.run(on_save=lambda tr: saved.append(tr.step), progress=False)
    assert saved == [4] and (tmp_path / "checkpoint.pt").exists()
    resumed = make(model, images, tmp_path, steps=100, save_every=1000)
    assert resumed.resume() and resumed.step == 4


@pytest.mark.parametrize("interrupt_at", [3, 4])
def test_ctrl_c_in_the_backward_pass_resumes_bit_identical(model, images, tmp_path, interrupt_at):
    """A Ctrl-C in the middle of a step (here in its backward pass, the longest part) saves the
    state of the steps before it, under their number, and the resumed run ends where an
    uninterrupted one does, also where the step had just added a progressive vector (step 4)."""
    kw = dict(steps=6, num_vectors=4, progressive_every=2)  # a vector added at steps 2 and 4: 3 at the end
    full = make(model, images, tmp_path / "full", **kw)
    full.run(progress=False)
    cut = make(model, images, tmp_path / "cut", **kw)
    hook = cut.learned.vectors[0].register_hook(
        lambda grad: (_ for _ in ()).throw(KeyboardInterrupt()) if cut.step == interrupt_at else grad)
    with pytest.raises(KeyboardInterrupt):
        cut.run(progress=False)
    hook.remove()
    assert cut.step == interrupt_at and len(cut.losses) == interrupt_at  # the cut step is not counted
    resumed = make(model, images, tmp_path / "cut", **kw)
    assert resumed.resume() and resumed.step == interrupt_at
    resumed.run(progress=False)
    assert resumed.active == full.active == 3
    assert torch.equal(resumed.embedding(), full.embedding()) and resumed.losses == full.losses


def test_the_saved_word_has_the_active_vectors_only(model, images, tmp_path):
    """A progressive run stopped before its last vector: the word it samples and scores with is
    the one its files hold, without the rows not yet added nor the per-image tokens."""
    t = make(model, images, tmp_path, steps=3, num_vectors=3, progressive_every=2, per_image_tokens=True)
    t.run(progress=False)
    word = t.saved_word()
    assert t.active == 2 and word.words == ["<x>"] and torch.equal(word.vectors[0], t.embedding())
    assert word.expand("a photo of a <x>") == "a photo of a <x> <x>_1"
    assert set(word.mapping()) == set(t.learned.token_ids("<x>")[:2])


def test_the_cached_posteriors_and_a_training_batch_carry_no_graph(model, images):
    """encode_images runs once, without gradients even on a model that would take them; a batch
    drawn from it is the same for the same generator seed."""
    from inversion.textual_inversion import encode_images, noisy_latents
    assert any(p.requires_grad for p in model.parameters())
    means, stds = encode_images(model, images)
    assert means.shape[0] == 2 * len(images) and not means.requires_grad and not stds.requires_grad
    n = len(images)  # rows N..2N-1: the mirror images, the random flip's other half
    with torch.no_grad():
        assert torch.allclose(means[:n], model.vae.encode(images).mean, atol=1e-5)
        assert torch.allclose(means[n:], model.vae.encode(images.flip(-1)).mean, atol=1e-5)
    assert not torch.allclose(means[:n], means[n:], atol=1e-3)
    rows = torch.tensor([0, 3, 1])
    z_t, noise, t = noisy_latents(model, means, stds, rows, torch.Generator().manual_seed(5))
    again = noisy_latents(model, means, stds, rows, torch.Generator().manual_seed(5))
    assert z_t.shape == noise.shape == (3, *means.shape[1:]) and t.shape == (3,)
    assert all(torch.equal(a, b) for a, b in zip((z_t, noise, t), again))


def test_large_images_are_encoded_a_few_pixels_at_a_time(model, images, monkeypatch):
    """The encoder's memory grows with its batch's pixels: images go at most 8 at a time and at
    most ENCODE_BATCH_PIXELS at a time (at SD's 256 px, one by one: 8 of them in fp32 took
    SD's encoder 1.3 GB), with the same posteriors."""
    import inversion.textual_inversion as ti
    batches, encode = [], model.vae.encode
    monkeypatch.setattr(model.vae, "encode", lambda x: batches.append(len(x)) or encode(x))
    five = torch.cat([images, images[:2].flip(-2)])  # 5 images of 16 px, and their 5 mirror images
    means, stds = ti.encode_images(model, five)
    assert batches == [8, 2]
    batches.clear()
    ti.encode_images(model, torch.zeros(2, 3, 256, 256))  # SD's training size at 256 px: one by one
    assert batches == [1, 1, 1, 1]
    batches.clear()
    monkeypatch.setattr(ti, "ENCODE_BATCH_PIXELS", 3 * 16 * 16)
    fewer, _ = ti.encode_images(model, five)
    assert batches == [3, 3, 3, 1]
    torch.testing.assert_close(fewer, means, rtol=1e-5, atol=1e-6)


def test_whole_context_learns_the_images_with_the_frozen_model(model, images):
    """The results tables' comparison row: the 77 × D context itself, learned with TI's loss."""
    import torch.nn.functional as F
    from inversion.textual_inversion import encode_images, noisy_latents
    from tinyworld import whole_context
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = model.encode_prompts(["a photo of a object"])[0]
    context = whole_context.learn(model, images, "a photo of a object", steps=30, seed=0, lr=5e-2, batch=4)
    assert context.shape == start.shape and not torch.equal(context, start)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    means, stds = encode_images(model, images)
    g = torch.Generator().manual_seed(9)  # the same 32 noisy latents for both contexts
    z_t, noise, t = noisy_latents(model, means, stds, torch.arange(6).repeat(6)[:32], g)
    with torch.no_grad():
        loss = lambda c: F.mse_loss(model.unet(z_t, t, c.expand(32, -1, -1)), noise).item()
        assert loss(context) < loss(start)


def test_a_loss_log_that_cannot_be_written_is_a_warning(model, images, tmp_path, monkeypatch):
    """loss.csv open in a spreadsheet on Windows cannot be replaced: the run goes on and saves its word."""
    import inversion.trainer as trainer  # where the loop writes its files
    real = trainer.atomic_write

    def locked(path, write):
        if path.name == "loss.csv" and not locked.released:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, write)
    locked.released = False
    monkeypatch.setattr(trainer, "atomic_write", locked)
    t = make(model, images, tmp_path)  # saves at steps 3 and 6
    messages, saved = [], []
    t.log = messages.append
    t.run(on_save=lambda tr: (saved.append(tr.step), setattr(locked, "released", tr.step == 6)), progress=False)
    assert saved == [3, 6] and t.step == 6
    assert len(messages) == 1 and "could not write" in messages[0] and "loss.csv" in messages[0]
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 7  # at the next save: the header and 6 steps


def test_a_run_whose_loss_stays_nan_stops_in_one_line(model, images, tmp_path, monkeypatch):
    """One NaN loss is skipped with a warning; ten in a row (a learning rate far too large) end the run."""
    from inversion.trainer import MAX_SKIPPED_STEPS
    t = make(model, images, tmp_path, steps=100, save_every=1000)
    real_loss = t.loss
    monkeypatch.setattr(t, "loss", lambda step: real_loss(step) * (float("nan") if t.step >= 3 else 1.0))
    with pytest.raises(TrainingError, match=f"NaN or infinite at each of the last {MAX_SKIPPED_STEPS} steps"):
        t.run(progress=False)
    assert t.step == 3 + MAX_SKIPPED_STEPS and len(t.losses) == 3
    t = make(model, images, tmp_path / "once", steps=12)
    once_loss = t.loss
    monkeypatch.setattr(t, "loss", lambda step: once_loss(step) * (float("nan") if t.step == 5 else 1.0))
    t.run(progress=False)
    assert t.step == 12 and len(t.losses) == 11  # the one NaN step skipped, the run finished


@pytest.mark.parametrize("per_layer", [False, True])
def test_gradient_checkpointing_keeps_the_numbers_and_saves_the_activations(model, per_layer):
    """With gradient checkpointing the U-Net's output and the gradient that reaches the text are
    the same bit for bit, while the forward pass keeps far fewer bytes for the backward pass
    (only each block's inputs). Per-layer texts (NeTI's) pass through it too."""
    unet = model.unet
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    text = torch.randn(2, 77, 32, generator=g)

    def run(checkpointing):
        unet.gradient_checkpointing = checkpointing
        context = text.clone().requires_grad_(True)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: kept.append(s.numel() * s.element_size()) or s,
                                                      lambda s: s):
            layers = [context * (i + 1) for i in range(unet.num_cross_attention_layers)] if per_layer else context
            out = unet(x, t, layers)
        out.pow(2).mean().backward()
        return out.detach(), context.grad, sum(kept)

    out, grad, kept = run(False)
    out_c, grad_c, kept_c = run(True)
    unet.gradient_checkpointing = False
    assert torch.equal(out, out_c) and torch.equal(grad, grad_c)
    assert kept_c < kept / 2, (kept_c, kept)
