"""A run's output directory under misuse and faults: earlier runs, concurrent runs, kills while re-saving, torn
metrics, hostile checkpoint files, and resumes with another configuration."""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from aquila.train.checkpoint import ConfigChangedError, resolve
from aquila.train.config import TrainConfig
from aquila.train.metrics import plot, read_metrics
from aquila.train.run_directory import LOCK_NAME
from aquila.train.trainer import train
from tests.helpers import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(inputs, output_dir, resume=False, messages=None, **changes):
    config = TrainConfig.load(None, tiny_overrides(inputs, output_dir, **changes))
    return train(config, resume=resume, log=(messages.append if messages is not None else lambda message: None))


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def listing(directory):
    return sorted(os.listdir(directory))


def python(code, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "aquila.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def earlier_run(tiny_run_inputs, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests copy it before changing it."""
    output = tmp_path_factory.mktemp("earlier") / "run"
    run(tiny_run_inputs, output, steps=4, save_interval=2)
    return output


def copy_of(earlier_run, tmp_path):
    shutil.copytree(earlier_run, tmp_path / "run")
    return tmp_path / "run"


# --- 5: a fresh run into an earlier run's directory ------------------------------------------------------------------

def test_a_fresh_run_into_a_directory_holding_an_earlier_run_is_refused(tiny_run_inputs, earlier_run, tmp_path):
    output = copy_of(earlier_run, tmp_path)
    before = {path: (output / path).read_bytes() for path in ("metrics.jsonl", "checkpoints/latest")}
    with pytest.raises(ValueError, match=r"run holds an earlier run \(checkpoints/step-000004, metrics.jsonl, "
                                         r"loss.png, config.yaml\): continue it with --resume, replace it with "
                                         r"--overwrite, or choose another --output-dir"):
        run(tiny_run_inputs, output, steps=2)
    assert {path: (output / path).read_bytes() for path in before} == before
    assert listing(output / "checkpoints") == ["latest", "step-000002", "step-000004"]
    assert not (output / LOCK_NAME).exists()


def test_overwrite_replaces_the_earlier_run_whole(tiny_run_inputs, earlier_run, tmp_path):
    output = copy_of(earlier_run, tmp_path)
    messages = []
    summary = run(tiny_run_inputs, output, messages=messages, steps=2, save_interval=1, overwrite=True)
    assert listing(output / "checkpoints") == ["latest", "step-000001", "step-000002"]
    assert resolve(str(output)) == summary["checkpoint"] == str(output / "checkpoints" / "step-000002")
    assert [r["step"] for r in records(output) if r["kind"] == "train"] == [1, 2]
    assert any("--overwrite: deleted the earlier run's checkpoints/step-000004, metrics.jsonl" in m for m in messages)
    assert "data" in listing(output) and ".overwritten" not in listing(output)  # the tokenized corpus is kept
    saved = TrainConfig.load(str(output / "config.yaml"))
    assert not saved.overwrite and saved.steps == 2  # reusing the saved config overwrites nothing


def test_resume_and_overwrite_together_are_refused(tiny_run_inputs, earlier_run, tmp_path):
    output = copy_of(earlier_run, tmp_path)
    with pytest.raises(ValueError, match=r"give --resume \(continue the run in the output directory\) or "
                                         r"--overwrite \(replace it\), not both"):
        run(tiny_run_inputs, output, resume=True, overwrite=True)
    assert listing(output / "checkpoints") == ["latest", "step-000002", "step-000004"]


def test_overwrite_is_a_bare_flag_of_the_pretrain_command(tiny_run_inputs, earlier_run, tmp_path):
    output = copy_of(earlier_run, tmp_path)
    process = cli("pretrain", *tiny_overrides(tiny_run_inputs, output, steps=1, eval_interval=1), "--overwrite")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert listing(output / "checkpoints") == ["latest", "step-000001"]


# --- 6: two runs into one directory ----------------------------------------------------------------------------------

def test_two_runs_started_together_into_one_directory_leave_one_run(tiny_run_inputs, tmp_path):
    output = tmp_path / "run"
    processes = [cli("pretrain", *tiny_overrides(tiny_run_inputs, output, steps=3, eval_interval=3, seed=seed))
                 for seed in (1, 2)]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    assert sorted(code for code, _ in results) == [0, 1], results
    refusal = next(err for code, err in results if code == 1)
    # The lock's holder named by pid, or caught between taking the lock and writing its pid into it; or, started
    # after the first run ended, that run's outputs.
    assert ("is in use by pid" in refusal or "is in use by another run (its lock is being written)" in refusal
            or "holds an earlier run" in refusal)
    assert [r["step"] for r in records(output) if r["kind"] == "train"] == [1, 2, 3]
    assert json.loads((output / "checkpoints" / "step-000003" / "trainer.json").read_text())["config"]["seed"] == \
        [seed for (code, _), seed in zip(results, (1, 2)) if code == 0][0]
    assert not (output / LOCK_NAME).exists()


def test_a_run_into_a_directory_in_use_is_refused_naming_the_holder(tiny_run_inputs, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    env = {**os.environ, "PYTHONPATH": ROOT}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(output)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"run is in use by pid {holder.pid} on host {socket.gethostname()} "
                                             rf"\(since .*\): wait for that run to end or choose another --output-dir"):
            run(tiny_run_inputs, output, steps=1)
        assert listing(output) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait(timeout=60)


HOLD_THE_LOCK = """
import sys, time
from aquila.train.run_directory import RunLock
with RunLock(sys.argv[1], print):
    print("locked", flush=True)
    time.sleep(120)
"""


def dead_pid():
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                             check=True)
    return int(process.stdout)


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(tiny_run_inputs, earlier_run, tmp_path):
    output = copy_of(earlier_run, tmp_path)
    pid = dead_pid()
    (output / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    messages = []
    summary = run(tiny_run_inputs, output, resume=True, messages=messages, steps=5, save_interval=2)
    assert summary["steps"] == 5
    assert any(f"warning: taking over the lock {output / LOCK_NAME} of pid {pid}" in m for m in messages)
    assert not (output / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_refused(tiny_run_inputs, earlier_run, tmp_path):
    output = copy_of(earlier_run, tmp_path)
    (output / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(ValueError, match=r"run may be in use by pid 1 on host elsewhere \(since then\): its lock file "
                                         r".*run.lock is not held, but that process cannot be checked from here or is "
                                         r"alive; delete the lock file if no run uses the directory"):
        run(tiny_run_inputs, output, resume=True)
    assert (output / LOCK_NAME).exists()


# --- 7: a kill while re-saving a step --------------------------------------------------------------------------------

# Resumes a finished run (which saves its last step again), killing the process at the kill_at-th rename or deletion
# of an entry of the checkpoints directory.
KILL_AT_A_CHECKPOINT_CHANGE = """
import os, shutil, sys

checkpoints, kill_at = os.path.abspath(sys.argv[1]), int(sys.argv[2])
calls = 0


def killing(original):
    def call(path, *args, **kwargs):
        global calls
        if os.path.dirname(os.path.abspath(path)) == checkpoints:
            calls += 1
            if calls == kill_at:
                os._exit(9)
        return original(path, *args, **kwargs)
    return call


os.replace, os.rename, shutil.rmtree = killing(os.replace), killing(os.rename), killing(shutil.rmtree)
from aquila.cli import main

main(["pretrain", "--resume", *sys.argv[3:]])
"""


def test_a_kill_at_any_point_of_re_saving_a_step_leaves_a_good_checkpoint(tiny_run_inputs, tmp_path):
    finished = tmp_path / "finished"
    run(tiny_run_inputs, finished, steps=2, keep_checkpoints=1)
    kill_at = 0
    while True:
        kill_at += 1
        output = tmp_path / f"killed-{kill_at}"
        shutil.copytree(finished, output)
        overrides = tiny_overrides(tiny_run_inputs, output, steps=2, keep_checkpoints=1)
        result = python(KILL_AT_A_CHECKPOINT_CHANGE, str(output / "checkpoints"), str(kill_at), *overrides)
        assert result.returncode in (0, 9), result.stderr[-2000:]
        checkpoint = resolve(str(output))
        assert os.path.basename(checkpoint) in ("step-000002", ".step-000002.previous")
        assert os.path.getsize(os.path.join(checkpoint, "model.safetensors")) > 0
        messages = []
        summary = run(tiny_run_inputs, output, resume=True, messages=messages, steps=3, keep_checkpoints=1)
        assert any(m.startswith("resumed from") and m.endswith("at step 2") for m in messages), messages
        assert summary["steps"] == 3 and listing(output / "checkpoints") == ["latest", "step-000003"]
        if result.returncode == 0:  # the save finished before the kill_at-th change: every point was tried
            break
    assert kill_at >= 4  # the old copy moved aside, the new one in, latest replaced, the old copy deleted


# --- 8: a torn metrics.jsonl -----------------------------------------------------------------------------------------

RECORD = {"kind": "train", "step": 1, "loss": 5.0, "tokens_per_s": 100.0}


def test_a_torn_last_metrics_line_is_skipped_with_a_warning_naming_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "step": 2}) + "\n" + '{"kind": "tra')
    warnings = []
    assert [r["step"] for r in read_metrics(str(path), warnings.append)] == [1, 2]
    assert warnings == [f"warning: {path}:3: skipped its last line, cut short by a killed run"]
    assert os.path.getsize(plot(str(path), str(tmp_path / "loss.png"), warnings.append)) > 1000


def test_a_torn_metrics_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + '{"kind": "tra\n' + json.dumps(RECORD) + "\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: not a JSON record \("):
        read_metrics(str(path))


def test_a_resumed_run_after_a_kill_mid_metrics_line_succeeds(tiny_run_inputs, earlier_run, tmp_path):
    output = copy_of(earlier_run, tmp_path)
    with open(output / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 5, "lo')
    messages = []
    summary = run(tiny_run_inputs, output, resume=True, messages=messages, steps=6)
    assert "plot" in summary and [r["step"] for r in records(output) if r["kind"] == "train"][-2:] == [5, 6]
    assert f"warning: {output / 'metrics.jsonl'}: removed its last line, 32 bytes cut short by a killed run" in messages


# --- 9: hostile pickles in a checkpoint ------------------------------------------------------------------------------

class WritesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


def test_a_pickle_payload_in_dcp_metadata_does_not_run_on_resume(tiny_run_inputs, earlier_run, tmp_path):
    output = copy_of(earlier_run, tmp_path)
    marker = tmp_path / "payload-ran"
    for step in ("step-000002", "step-000004"):
        metadata = output / "checkpoints" / step / "train_state" / ".metadata"
        metadata.write_bytes(pickle.dumps(WritesAFile(marker)))
    messages = []
    with pytest.raises(ValueError, match="no loadable checkpoint in"):
        run(tiny_run_inputs, output, resume=True, messages=messages, steps=5)
    assert not marker.exists()
    refusals = [m for m in messages if "cannot be loaded" in m]
    assert len(refusals) == 2 and all("train_state/.metadata: refers to builtins.exec, which DCP metadata never "
                                      "holds; not loading it" in m for m in refusals), refusals


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, as intended
def test_a_pickle_payload_in_a_dcp_value_does_not_run(tmp_path):
    import torch.distributed.checkpoint as dcp

    from aquila.train.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

    marker = tmp_path / "payload-ran"
    dcp.save({"value": WritesAFile(marker)}, checkpoint_id=str(tmp_path / "state"))
    with pytest.raises(BaseException, match="Unsupported global: GLOBAL exec was not an allowed global"):
        dcp.load({"value": None}, storage_reader=SafeFileSystemReader(str(tmp_path / "state")),
                 planner=SafeLoadPlanner())
    assert not marker.exists()


# --- 17: resuming with another configuration -------------------------------------------------------------------------

def test_resume_with_a_changed_batch_seq_len_or_model_is_refused_listing_each_change(tiny_run_inputs, earlier_run,
                                                                                   tmp_path):
    output = copy_of(earlier_run, tmp_path)
    model = json.loads(dict(zip(*[iter(tiny_overrides(tiny_run_inputs, output))] * 2))["--model_overrides"])
    changed = json.dumps({**model, "n_layers": 3})
    with pytest.raises(ConfigChangedError) as refusal:
        run(tiny_run_inputs, output, resume=True, steps=6, batch_size=2, seq_len=16, model_overrides=changed)
    message = str(refusal.value)
    assert message.startswith(f"cannot resume {output / 'checkpoints' / 'step-000004'}: its run was configured "
                              "differently: model_overrides: ")
    assert "'n_layers': 2" in message and "'n_layers': 3" in message
    assert "; seq_len: 32 -> 16; global batch (batch_size x gradient_accumulation_steps x processes): 4 -> 2. " \
           "Resume with its values, or give --allow-config-change to go on with these" in message
    assert listing(output / "checkpoints") == ["latest", "step-000002", "step-000004"]


def test_allow_config_change_resumes_with_a_warning(tiny_run_inputs, earlier_run, tmp_path):
    output = copy_of(earlier_run, tmp_path)
    messages = []
    summary = run(tiny_run_inputs, output, resume=True, messages=messages, steps=6, batch_size=2,
                  allow_config_change=True)
    assert summary["steps"] == 6 and len(summary["losses"]) == 2
    assert any("warning: resuming" in m and "(allow_config_change): global batch (batch_size x "
               "gradient_accumulation_steps x processes): 4 -> 2" in m for m in messages), messages
