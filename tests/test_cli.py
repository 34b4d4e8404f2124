"""The `fastgpt2` command: Texar GPT-2 README commands run as written (against a local Hugging Face cache holding
random weights under the official repo name), and bad values exit with status 2 and one clear line."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

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


# -- reliability: prompt files, error classes, Ctrl-C, over-long prompts, --stream, --seed --------------------------
def _one_line_error(r, *fragments):
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("fastgpt2: error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    for fragment in fragments:
        assert fragment in r.stderr


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_bad_prompt_file_fails_before_the_model_loads(tmp_path, kind):
    # gpt2-large is not in the empty cache: had the model been loaded first, the error would be about its weights.
    path = tmp_path / "prompts" if kind == "directory" else tmp_path / "missing.txt"
    if kind == "directory":
        path.mkdir()
    r = fastgpt2(["generate", "--model", "gpt2-large", "--prompt-file", str(path)], tmp_path)
    _one_line_error(r, f"--prompt-file {path}")


@pytest.mark.parametrize("prompt", [["--prompt", "hi"], ["--prompt-file", "-"]])
def test_interactive_with_a_prompt_is_refused(tmp_path, prompt):
    r = fastgpt2(["generate", "--model", "gpt2-large", "--interactive", *prompt], tmp_path, stdin="hi\n")
    _one_line_error(r, "--interactive", prompt[0])


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_prompt_file_that_is_not_utf8_is_named(tmp_path, source):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    args = ["generate", "--model", "gpt2-large", "--prompt-file", str(path) if source == "file" else "-"]
    r = subprocess.run([sys.executable, "-m", "fastgpt2", *args], input=path.read_bytes(), capture_output=True,
                       env={**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}, timeout=300)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    _one_line_error(r, str(path) if source == "file" else "standard input", "UTF-8")


def test_prompt_file_is_read_as_utf8(hf_cache, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes("\ufeffThe sky\r\n".encode("utf-8"))  # a BOM and a Windows line end, as Notepad writes them
    args = ["generate", "--temperature", "0", "--max-tokens", "5"]
    from_file = fastgpt2(args + ["--prompt-file", str(path)], hf_cache)
    inline = fastgpt2(args + ["--prompt", "The sky\n"], hf_cache)
    assert from_file.returncode == 0 and inline.returncode == 0, from_file.stderr + inline.stderr
    assert from_file.stdout == inline.stdout


def test_type_errors_are_bugs_not_user_errors(monkeypatch, capsys):
    from fastgpt2.cli import info, main

    def raises(exc):
        def run(args):
            raise exc
        return run

    monkeypatch.setattr(info, "run", raises(ValueError("a bad value")))
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "fastgpt2: error: a bad value\n"
    monkeypatch.setattr(info, "run", raises(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        main(["info"])


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    # `fastgpt2 info | head -0`: the reader closes the pipe before the command writes (it is still importing);
    # no traceback, status 1 as other tools give.
    child = subprocess.Popen([sys.executable, "-m", "fastgpt2", "info"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=tmp_path)
    child.stdout.close()
    _, err = child.communicate(timeout=300)
    assert child.returncode == 1 and b"Traceback" not in err, err.decode()


def _tokens(n: int) -> str:
    """A text of exactly n GPT-2 tokens."""
    return "a" + " a" * (n - 1)


@pytest.mark.parametrize("args,prompt,message", [
    ([], _tokens(300), "the prompt has 300 tokens but the model's context is 256 tokens"),
    (["--max_decoding_length=100"], _tokens(150), "--max-decoding-length 100 leaves no room"),
])
def test_interactive_prompt_too_long_asks_again(hf_cache, args, prompt, message):
    r = fastgpt2(["generate", "--is_interactive", *(args or ["--max-tokens=5"])], hf_cache, stdin=f"{prompt}\nHello\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("fastgpt2: error: ") and message in r.stderr
    assert r.stdout.count("Model input >>> ") == 3
    assert r.stdout.count("SAMPLE 1") == 1  # only Hello's: no rule for the sample that never started


def test_stream_with_a_batch_is_refused(hf_cache):
    r = fastgpt2(["generate", "--prompt", "hi", "--stream", "--nsamples=4", "--batch-size=2"], hf_cache)
    _one_line_error(r, "--stream", "--batch-size")


def test_stream_prints_several_samples_in_turn(hf_cache):
    args = ["generate", "--prompt", "The sky", "--temperature", "0", "--max-tokens", "8", "--nsamples", "2"]
    plain, streamed = fastgpt2(args, hf_cache), fastgpt2(args + ["--stream"], hf_cache)
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert streamed.stdout == plain.stdout and "SAMPLE 2" in streamed.stdout


def test_interactive_batch_says_why_it_does_not_stream(hf_cache):
    r = fastgpt2(["generate", "--is_interactive", "--nsamples=2", "--batch_size=2", "--max-tokens=5"], hf_cache,
                 stdin="Hello\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "--batch-size 2" in r.stderr and "stream" in r.stderr
    assert "SAMPLE 1" in r.stdout and "SAMPLE 2" in r.stdout


@pytest.mark.parametrize("seed", ["-1", str(2**64), "1.5"])
def test_bad_seed_names_the_flag(tmp_path, seed):
    r = fastgpt2(["generate", "--model", "124M", "--random-weights", "--prompt", "hi", "--seed", seed], tmp_path)
    _one_line_error(r, "--seed", "[0, 2**64 - 1]")


def test_largest_seed_is_accepted(hf_cache):
    r = fastgpt2(["generate", "--prompt", "hi", "--max-tokens", "3", "--seed", str(2**64 - 1)], hf_cache)
    assert r.returncode == 0, r.stderr


def test_ctrl_c_while_printing_frees_the_request(monkeypatch, capsys):
    # Ctrl-C can land in the CLI's own loop rather than inside the engine; the cancelled request must still be
    # aborted (not left to run on in later steps), and the next greedy sample, whose prompt starts with the cancelled
    # one (so the prefix cache may offer its blocks), must equal a fresh engine's. The second prompt leaves room for
    # 16 tokens of the 256-token context, so it ends long before a leaked first request could.
    from fastgpt2 import LLM
    from fastgpt2.cli import build_parser, generate

    torch.manual_seed(0)
    llm = LLM(TINY_CONFIGS["tiny"], device="cpu", max_num_seqs=4)
    args = build_parser().parse_args(["generate", "--interactive", "--temperature", "0", "--max-tokens", "200"])
    answers = [_tokens(40), _tokens(240)]  # then end of input
    pieces_before_ctrl_c = [3]

    def fake_input(text):
        print(text, end="")
        if not answers:
            raise EOFError
        return answers.pop(0)

    def fake_print(*values, **kwargs):
        if kwargs.get("end") == "" and pieces_before_ctrl_c:  # a streamed piece of the first sample
            pieces_before_ctrl_c[0] -= 1
            if not pieces_before_ctrl_c[0]:
                pieces_before_ctrl_c.clear()
                raise KeyboardInterrupt
        print(*values, **kwargs)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(generate, "print", fake_print, raising=False)
    assert generate._interactive(llm, args, stream=True) == 0
    out = capsys.readouterr().out
    assert out.count("Model input >>> ") == 3 and out.count("SAMPLE 1") == 2 and out.count("=" * 90) == 1
    engine = llm.engine
    assert not engine.requests and not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    second = out.split("SAMPLE 1 " + "=" * 40 + "\n")[2].split("\n" + "=" * 90)[0]
    fresh = LLM(llm.model, max_num_seqs=4).generate(_tokens(240), generate._params(args, 240), use_tqdm=False)
    assert second == fresh[0].outputs[0].text


class _Session:
    """A `fastgpt2 generate --interactive` process driven through pipes, its stdout collected by a thread."""

    def __init__(self, args, cache):
        env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fastgpt2", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     # A test run started in the background (`pytest &`) ignores SIGINT, and a child
                                     # inherits that: restore the default so that the child's Python turns it into
                                     # KeyboardInterrupt as in a terminal.
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.out = b""
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self):
        while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
            self.out += chunk

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", errors="replace")

    def wait_until(self, done, what: str, timeout: float = 240.0):
        deadline = time.monotonic() + timeout
        while not done():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what} (exit {self.proc.wait()}): {self.text[-500:]!r} "
                            f"{self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)

    def wait_for(self, fragment: str, count: int = 1):
        self.wait_until(lambda: self.text.count(fragment) >= count, f"{count}x {fragment!r}")

    def send(self, line: str):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


def test_ctrl_c_cancels_the_sample_and_asks_again(tmp_path):
    # 124M has a 1024-token context: the first sample runs for 1000 tokens (past EOS), so Ctrl-C lands while it
    # generates; the second prompt leaves room for only 14 tokens, so it finishes.
    s = _Session(["generate", "--model", "124M", "--random-weights", "--seed", "0", "--interactive",
                  "--max-tokens", "1000", "--ignore-eos"], tmp_path)
    try:
        s.wait_for("Model input >>> ")
        s.send("Hello")
        s.wait_for("SAMPLE 1")
        started = len(s.text)
        s.wait_until(lambda: len(s.text) > started + 20, "streamed tokens")
        s.proc.send_signal(signal.SIGINT)
        s.wait_for("Model input >>> ", 2)
        assert "=" * 90 not in s.text  # the interrupted sample has no closing rule
        s.send(_tokens(1010))
        s.wait_for("=" * 90)
        s.wait_for("Model input >>> ", 3)
        assert s.text.count("SAMPLE 1") == 2
        s.proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt quits
        assert s.proc.wait(timeout=60) == 0
        assert "Traceback" not in s.proc.stderr.read().decode()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
