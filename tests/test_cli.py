"""The `fastgpt2` command: Texar GPT-2 README commands run as written (against a local Hugging Face cache holding
random weights under the official repo name), and bad values exit with status 2 and one clear line."""
import os
import subprocess
import sys

import pytest

from tests.conftest import TINY_CONFIGS, make_hf_model


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """An offline Hugging Face cache in which 'openai-community/gpt2' holds a tiny random model."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / "models--openai-community--gpt2"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    make_hf_model(TINY_CONFIGS["tiny"], seed=4).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return cache


def fastgpt2(args, cache, stdin=""):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fastgpt2", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=300)


def test_texar_interactive_command_as_written(hf_cache):
    # Texar's README: python gpt2_generate_main.py --is_interactive --max_decoding_length=100 --temperature=0.7 --top_k=40
    r = fastgpt2(["generate", "--is_interactive", "--max_decoding_length=100", "--temperature=0.7", "--top_k=40"],
                 hf_cache, stdin="Hello world\n\nSecond prompt\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Model input >>> ") == 4  # two prompts, one empty line, then end of input
    assert "Prompt should not be empty!" in r.stdout
    assert r.stdout.count("SAMPLE 1") == 2


def test_texar_unconditional_batch_command(hf_cache):
    r = fastgpt2(["generate", "--config_model=117M", "--nsamples=4", "--batch_size=2", "--max_decoding_length=20",
                  "--temperature=0.7", "--top_k=40", "--seed", "1"], hf_cache)
    assert r.returncode == 0, r.stderr
    assert [f"SAMPLE {i}" in r.stdout for i in (1, 2, 3, 4)] == [True] * 4
    again = fastgpt2(["generate", "--config_model=117M", "--nsamples=4", "--batch_size=2", "--max_decoding_length=20",
                      "--seed", "1"], hf_cache)
    assert again.stdout == r.stdout  # --seed makes runs reproducible


def test_prompt_greedy_stream(hf_cache):
    args = ["generate", "--prompt", "The sky", "--temperature", "0", "--max-tokens", "15"]
    plain, streamed = fastgpt2(args, hf_cache), fastgpt2(args + ["--stream"], hf_cache)
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == streamed.stdout


@pytest.mark.parametrize("args,message", [
    (["--top_p=40"], "top_p must be in (0, 1], got 40.0"),
    (["--temperature=-1"], "temperature must be"),
    (["--nsamples=3", "--batch_size=2"], "must be a multiple of --batch-size"),
    (["--max-tokens=0"], "max_tokens must be"),
    (["--top-k=-5"], "top_k must be"),
])
def test_bad_values_exit_2_with_one_line(hf_cache, args, message):
    r = fastgpt2(["generate", "--prompt", "hi", *args], hf_cache)
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_offline_without_weights_says_what_to_do(tmp_path):
    r = fastgpt2(["generate", "--model", "gpt2-large", "--prompt", "hi"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--random-weights" in r.stderr and "local" in r.stderr and r.stderr.count("\n") == 1


def test_random_weights_run_offline(tmp_path):
    r = fastgpt2(["generate", "--model", "124M", "--random-weights", "--prompt", "hi", "--max-tokens", "3",
                  "--seed", "0"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "SAMPLE 1" in r.stdout
