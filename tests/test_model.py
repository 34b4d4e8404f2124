"""The model against Hugging Face transformers' GPT-2: same weights, same inputs, same logits, loss and gradients;
dropout in train mode only; trainable parameters from from_pretrained; a dense forward free of the inference path."""
import pytest
import torch

from fastgpt2 import GPT2, GPT2Config
from fastgpt2.model import inference
from fastgpt2.model.gpt2 import GPT2Output
from tests.conftest import TINY_CONFIGS, make_hf_model

CONFIGS = {
    **TINY_CONFIGS,
    "124M": GPT2Config.from_name("124M"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    config = CONFIGS[name]
    hf = make_hf_model(config, seed=1)
    hf.save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path, device="cpu", dtype="float32")
    ids = torch.randint(0, config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids).logits
    assert out.shape == (3, 37, config.vocab_size)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_save_pretrained_loads_in_transformers(name, tmp_path):
    import transformers

    config = CONFIGS[name]
    torch.manual_seed(3)
    model = GPT2.from_pretrained(config, device="cpu")
    model.save_pretrained(tmp_path)
    for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert (tmp_path / f).is_file(), f
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    # And back into fastgpt2: identical parameters.
    again = GPT2.from_pretrained(tmp_path, device="cpu")
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_bfloat16_close_to_float32(hf_checkpoint):
    directory = hf_checkpoint("tiny")
    f32 = GPT2.from_pretrained(directory, device="cpu", dtype="float32")
    bf16 = GPT2.from_pretrained(directory, device="cpu", dtype="bfloat16")
    assert bf16.wte.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        a, b = f32(ids).logits, bf16(ids).logits.float()
    # bf16 keeps ~3 significant digits; compare relative to the logit scale.
    assert (a - b).abs().max() / a.abs().max() < 0.05


def test_random_init_statistics():
    model = GPT2(GPT2Config(n_layer=4, n_head=2, n_embd=128, vocab_size=1000, n_positions=64))
    assert abs(model.wte.weight.std().item() - 0.02) < 0.002
    assert model.h[0].attn.c_attn.bias.abs().max() == 0
    assert abs(model.h[0].mlp.c_proj.weight.std().item() - 0.02 / (8 ** 0.5)) < 0.002
    assert torch.equal(model.ln_f.weight, torch.ones(128))


def test_dense_input_errors():
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=128, vocab_size=100, n_positions=16))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, 100]]))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="exactly one of input_ids .* got neither"):
        model()
    with pytest.raises(ValueError, match="exactly one of input_ids .* got both"):
        model(torch.zeros(1, 3, dtype=torch.long), inputs_embeds=torch.zeros(1, 3, 128))
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch, seq, 128\); got shape \(1, 3, 64\)"):
        model(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="inputs_embeds must be a float tensor"):
        model(inputs_embeds=torch.zeros(1, 3, 128, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(inputs_embeds=torch.zeros(1, 17, 128))
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must have the inputs' shape \(2, 3\); got shape \(2, 2\)"):
        model(ids, labels=ids[:, :2])
    with pytest.raises(ValueError, match="label 100 is out of range .* use -100"):
        model(ids, labels=torch.tensor([[1, 100, -100], [0, 0, 0]]))
    with pytest.raises(ValueError, match="label -5 is out of range"):
        model(ids, labels=torch.tensor([[1, -5, -100], [0, 0, 0]]))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        model(ids, labels=ids.float())
    with pytest.raises(TypeError):  # the engine's packed call is forward_paged, never forward
        model(ids[0], ids[0], None, None)


# Irregular vocabulary; heads of 64 as in every GPT-2 size. Small enough for backward passes on CPU.
LM_CONFIG = GPT2Config(vocab_size=517, n_positions=64, n_embd=128, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers' GPT2LMHeadModel, fastgpt2's GPT2) with the same random weights, both float32 in eval mode."""
    hf = make_hf_model(LM_CONFIG, seed=7)
    directory = tmp_path_factory.mktemp("lm")
    hf.save_pretrained(directory)
    return hf, GPT2.from_pretrained(directory, device="cpu", dtype="float32")


def _batch(seed=0, batch=3, seq=29):
    """Token ids and labels = ids with -100 at scattered positions (a whole row ignored but one token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LM_CONFIG.vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    labels[torch.rand(batch, seq, generator=g) < 0.3] = -100
    labels[1, :-1] = -100  # the last label has no position predicting it: row 1 adds nothing to the loss
    labels[2, 1] = -100
    return ids, labels


def test_loss_matches_transformers(pair):
    hf, model = pair
    ids, labels = _batch()
    with torch.no_grad():
        ref = hf(ids, labels=labels)
        out = model(ids, labels=labels)
    assert isinstance(out, GPT2Output) and out.loss.shape == () and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)  # float32; logits reach ~30 (ln_f margin)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    # The loss is the mean over the targets that are not -100: recomputed by hand from the logits.
    logp = out.logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    manual = -logp[keep].gather(1, target[keep][:, None]).mean()
    torch.testing.assert_close(out.loss, manual, atol=1e-5, rtol=1e-5)
    assert out[0] is out.loss and out[1] is out.logits
    plain = model(ids)
    assert plain.loss is None and plain[0] is plain.logits and torch.equal(plain.logits, out.logits)


def test_inputs_embeds_match_transformers(pair):
    hf, model = pair
    ids, labels = _batch(seed=1)
    embeds = torch.randn(3, 29, LM_CONFIG.n_embd, generator=torch.Generator().manual_seed(2)) * 0.1
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, labels=labels)
        out = model(inputs_embeds=embeds, labels=labels)
        # wte's rows as inputs_embeds run exactly the ops of input_ids.
        same = model(inputs_embeds=model.wte(ids))
        assert torch.equal(same.logits, model(ids).logits)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_gradients_match_transformers(pair):
    hf, model = pair
    ids, labels = _batch(seed=3)
    embeds = (torch.randn(3, 29, LM_CONFIG.n_embd, generator=torch.Generator().manual_seed(4)) * 0.1)
    for m in (hf, model):
        m.zero_grad(set_to_none=True)
    hf_embeds, embeds = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()
    hf(ids, labels=labels).loss.backward()
    model(ids, labels=labels).loss.backward()
    hf(inputs_embeds=hf_embeds, labels=labels).loss.backward()  # accumulates onto the input_ids gradients
    model(inputs_embeds=embeds, labels=labels).loss.backward()
    ref = {n.removeprefix("transformer."): p.grad for n, p in hf.named_parameters()}  # lm_head is wte: one entry
    ours = {n: p.grad for n, p in model.named_parameters()}
    assert sorted(ref) == sorted(ours)
    for name, grad in ours.items():
        expected = ref[name]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            expected = expected.t()  # Conv1D (in, out) against nn.Linear (out, in)
        assert grad is not None and grad.abs().max() > 0, name
        # float32 with other summation orders: measured differences stay below 1e-6 of each tensor's largest entry.
        torch.testing.assert_close(grad, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4, msg=name)
    torch.testing.assert_close(embeds.grad, hf_embeds.grad, atol=1e-5 * hf_embeds.grad.abs().max().item(), rtol=1e-4)
    for m in (hf, model):
        m.zero_grad(set_to_none=True)


def test_train_mode_dropout_matches_transformers(pair):
    """transformers draws its dropout masks in the same order (embeddings; per block: the attention probabilities
    inside scaled_dot_product_attention, attention output, MLP output), so the same seed gives the same masks."""
    hf, model = pair
    assert hf.config._attn_implementation == "sdpa"  # the masks of eager attention come from another op
    ids, labels = _batch(seed=5)
    try:
        hf.train(), model.train()
        torch.manual_seed(11)
        ref = hf(ids, labels=labels)
        torch.manual_seed(11)
        out = model(ids, labels=labels)
        again = model(ids, labels=labels)  # the generator has moved on: other masks
    finally:
        hf.eval(), model.eval()
    with torch.no_grad():
        evaluated = model(ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert (out.logits - evaluated.logits).abs().max() > 1.0
    assert (out.logits - again.logits).abs().max() > 1.0


def _dropout_model(seed=0, **pdrop):
    torch.manual_seed(seed)
    return GPT2(LM_CONFIG.replace(**pdrop)).eval()


def test_eval_mode_has_no_dropout():
    ids, _ = _batch(seed=6)
    heavy, none = _dropout_model(embd_pdrop=0.5, attn_pdrop=0.5, resid_pdrop=0.5), _dropout_model(
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    with torch.no_grad():
        a, b, c = heavy(ids).logits, heavy(ids).logits, none(ids).logits
    assert torch.equal(a, b) and torch.equal(a, c)


def test_zero_dropout_train_mode_equals_eval_bitwise():
    model = _dropout_model(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    ids, labels = _batch(seed=7)
    evaluated = model(ids, labels=labels)
    trained = model.train()(ids, labels=labels)
    assert torch.equal(trained.logits, evaluated.logits) and torch.equal(trained.loss, evaluated.loss)


@pytest.mark.parametrize("field,module", [("embd_pdrop", "drop"), ("resid_pdrop", "h.0.attn.resid_dropout"),
                                          ("resid_pdrop", "h.1.mlp.dropout")])
def test_dropout_zeroes_a_fraction_p_and_rescales(field, module):
    """p = 0.5 on one site: about half of its outputs are zero (11,136 draws: 6 standard deviations is 0.028), the
    others are the input times exactly 1 / (1 - p) = 2; eval mode leaves the input as it is."""
    model = _dropout_model(**{"embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.0, field: 0.5})
    seen = []
    model.get_submodule(module).register_forward_hook(lambda m, inputs, out: seen.append((inputs[0], out)))
    ids, _ = _batch(seed=8, batch=3, seq=29)
    with torch.no_grad():
        model(ids)
        torch.manual_seed(0)
        model.train()(ids)
    (x_eval, y_eval), (x, y) = seen
    assert torch.equal(y_eval, x_eval)
    zero = y == 0
    assert x.numel() == 3 * 29 * 128 and not (x == 0).any()
    assert abs(zero.float().mean().item() - 0.5) < 0.03
    assert torch.equal(y[~zero], x[~zero] * 2)


def test_attention_dropout_goes_to_sdpa_in_train_mode_only(monkeypatch):
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: seen.append(k["dropout_p"]) or real(*a, **k))
    model = _dropout_model(attn_pdrop=0.25)
    ids, _ = _batch(seed=9)
    with torch.no_grad():
        model(ids)
        model.train()(ids)
    assert seen == [0.0, 0.0, 0.25, 0.25]  # two layers, eval then train


def test_train_mode_differs_across_calls_and_from_eval():
    model = _dropout_model()  # GPT-2's 0.1 everywhere
    ids, _ = _batch(seed=10)
    with torch.no_grad():
        evaluated = model(ids).logits
        model.train()
        a, b = model(ids).logits, model(ids).logits
    assert not torch.equal(a, b) and not torch.equal(a, evaluated)


def test_from_pretrained_is_trainable(hf_checkpoint):
    loaded = GPT2.from_pretrained(hf_checkpoint("tiny"), device="cpu")
    model = GPT2.from_pretrained(LM_CONFIG, device="cpu")
    for m in (loaded, model):  # eval mode, as transformers' from_pretrained; trainable unless frozen by the caller
        assert not m.training and all(p.requires_grad for p in m.parameters())
    # A few steps of SGD on one batch lower its loss: every parameter gets a gradient.
    model.train()
    ids, labels = _batch(seed=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    frozen = GPT2.from_pretrained(LM_CONFIG, device="cpu").requires_grad_(False)
    assert not frozen(ids, labels=labels).loss.requires_grad


@pytest.mark.parametrize("grad,train", [(True, True), (True, False), (False, False)])
def test_dense_forward_uses_no_inference_layouts(grad, train, monkeypatch):
    """The dense forward is nn.Linear and F.linear(x, wte.weight) in every mode: the CPU inference layouts (W @ x.T
    projections, the sliced or transposed LM head) belong to forward_paged only."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dense forward reached an inference-only layout")

    model = _dropout_model().train(train)
    monkeypatch.setattr(torch, "addmm", refuse)  # W @ x.T and the sliced head are torch.addmm / torch.mm calls
    monkeypatch.setattr(torch, "mm", refuse)
    with torch.no_grad(), pytest.raises(AssertionError, match="inference-only"):  # the patches bite
        inference.linear(model.h[0].mlp.c_fc, torch.zeros(12, LM_CONFIG.n_embd))
    for name in ("linear", "lm_head", "_wte_transposed"):
        monkeypatch.setattr(inference, name, refuse)
    ids, labels = _batch(seed=13, batch=4, seq=3)  # 12 rows: the packed layouts' range of 9..256
    with torch.set_grad_enabled(grad):
        out = model(ids, labels=labels)
    assert out.logits.shape == (4, 3, LM_CONFIG.vocab_size) and out.loss.requires_grad == grad
