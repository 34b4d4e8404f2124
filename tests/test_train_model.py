"""The model as the trainer runs it: the Triton flash-attention and fused cross-entropy path (under Triton's
interpreter here; CUDA picks it by itself), one-process FSDP runs with activation checkpointing and with the bf16
mixed-precision policy, and the exact token-weighted validation loss."""
import copy
import json

import pytest
import torch

from fastgpt2.model import GPT2, GPT2Config
from fastgpt2.model.tokenizer import Tokenizer
from fastgpt2.train import TrainConfig, data, finetune, modeling
from fastgpt2.train.packing import PackedBlocks


@pytest.fixture
def one_thread():
    """In-process runs on one thread: on a shared 2-core machine a second OpenMP thread mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_flash_attention_and_fused_loss_match_the_plain_model(monkeypatch, one_thread):
    monkeypatch.setenv("FASTGPT2_FORCE_TRITON", "1")  # the Triton kernels on CPU tensors, under the interpreter
    torch.manual_seed(0)
    plain = GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=2, n_positions=32)).train()
    modeling.set_dropout(plain, 0.0)
    fused = copy.deepcopy(plain)
    assert modeling.use_flash_attention(fused, torch.device("cpu"))
    assert type(fused.h[0].attn) is modeling.FlashCausalSelfAttention
    assert list(fused.state_dict()) == list(plain.state_dict())  # checkpoints see the same names
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = ids.clone()
    targets[0, :5] = -100
    monkeypatch.setenv("FASTGPT2_FORCE_TRITON", "0")
    expected, count = modeling.token_loss_sum(plain(input_ids=ids).logits, targets)
    monkeypatch.setenv("FASTGPT2_FORCE_TRITON", "1")
    loss, fused_count = modeling.token_loss_sum(fused(input_ids=ids).logits, targets)
    expected.backward()
    loss.backward()
    assert count == fused_count == 43
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_flash_attention_is_not_used_with_attention_dropout():
    model = GPT2(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16))  # attn_pdrop 0.1 as in GPT-2
    assert not modeling.use_flash_attention(model, torch.device("cpu"))
    modeling.set_dropout(model, 0.2)
    assert model.config.attn_pdrop == 0.2 and model.h[0].attn.attn_pdrop == 0.2 and model.drop.p == 0.2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "the cat sat on a mat and saw one red bird fly over old green hills".split()
    gen = torch.Generator().manual_seed(3)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=gen)) for _ in range(60)]
    (root / "train.txt").write_text("\n".join(lines[:50]) + "\n")
    (root / "dev.txt").write_text("\n".join(lines[50:]) + "\n")
    torch.manual_seed(0)
    GPT2(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32)).save_pretrained(root / "tiny")
    return root


def _run(corpus, out, **changes) -> list[dict]:
    cfg = TrainConfig(model=str(corpus / "tiny"), train=str(corpus / "train.txt"), valid=str(corpus / "dev.txt"),
                      output_dir=str(corpus / out), max_steps=3, seq_len=16, micro_batch_size=3,
                      global_batch_tokens=96, lr=1e-3, warmup_steps=1, eval_every=0, save_every=0, progress=False)
    finetune(cfg.replace(**changes))
    return [json.loads(line) for line in (corpus / out / "metrics.jsonl").read_text().splitlines()]


def test_one_process_run_variants(corpus, one_thread):
    base = _run(corpus, "base")
    losses = [r["loss"] for r in base if "loss" in r]
    checkpointed = [r["loss"] for r in _run(corpus, "ac", activation_checkpointing=True, sample_prompt="the cat",
                                             sample_tokens=4) if "loss" in r]
    assert checkpointed == pytest.approx(losses, rel=1e-6)  # recomputation changes memory, not the math
    samples = [json.loads(line) for line in (corpus / "ac" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 3] and all(isinstance(s["text"], str) for s in samples)
    bf16 = [r["loss"] for r in _run(corpus, "bf16", dtype="bfloat16") if "loss" in r]
    assert bf16 == pytest.approx(losses, abs=0.05) and bf16 != losses  # bf16 compute, float32 master weights
    # The logged validation loss is the exact token-weighted mean over every validation token (11 blocks over
    # micro-batches of 3: the last one padded).
    tok = Tokenizer.from_pretrained()
    blocks = PackedBlocks(data.load_tokens(str(corpus / "dev.txt"), "valid", tok), seq_len=16)
    ids, targets = blocks.batch(list(range(len(blocks))))
    final = GPT2.from_pretrained(corpus / "base" / "final", device="cpu")
    with torch.no_grad():
        total, count = modeling.token_loss_sum(final(input_ids=ids).logits, targets)
    assert base[-1]["val_loss"] == pytest.approx((total / count).item(), rel=1e-6)
    assert len(blocks) % 3 and base[-1]["step"] == 3


def test_training_bench_smoke(one_thread, capsys):
    pytest.importorskip("transformers")
    from fastgpt2.train import bench

    result = bench.main(["--smoke"])
    assert result["fastgpt2_tokens_per_s"] > 0 and result["transformers_tokens_per_s"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("  ratio (fastgpt2 / transformers tokens/s)")


def test_engine_sampler_serves_the_latest_weights(one_thread):
    from fastgpt2.cli.finetune import EngineSampler

    sampler = EngineSampler(TrainConfig(train="t.txt", sample_prompt="The cat", sample_tokens=5, seed=0))
    torch.manual_seed(0)
    first = GPT2(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32))
    text = sampler(0, first)
    assert isinstance(text, str) and sampler(1, first) == text  # seeded: the same weights give the same sample
    second = copy.deepcopy(first)
    with torch.no_grad():
        second.wte.weight.mul_(30.0)
    assert sampler(2, second) != text and sampler.llm.model.wte.weight.equal(second.wte.weight)
