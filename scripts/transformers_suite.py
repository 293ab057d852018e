"""transformers' own common model tests on Llama, unpatched and with Aquila's kernels patched into the classes.

    python scripts/transformers_suite.py --transformers-sdist transformers-5.25.0.tar.gz

transformers' wheel holds no tests; its source distribution (sdist) holds the common mixins under tests/ but not the
model test files, nor two modules the mixins import: tests/generation/test_utils.py (GenerationTesterMixin) and
tests/exporters/test_export.py (ExportTesterMixin). So this script:
- unpacks the sdist's tests/ (of the installed transformers version: --transformers-sdist, else `pip download`) into
  a temporary directory, never into the repository;
- writes there empty stand-ins for those two mixins (their tests are not run), a pytest plugin, and a Llama test
  module of this project's: a tiny config (2 layers, hidden 32, 4 heads over 2 key/value heads, vocab 99) and a
  batch of 13 x 7 tokens with a random padding mask, as transformers' suites give their models, run through
  transformers' ModelTesterMixin and TrainingTesterMixin on LlamaModel, LlamaForCausalLM and the three task heads;
- runs pytest on it twice, each in a fresh process: unpatched, then with apply_aquila_kernels_to_llama() (the
  class-level patch) applied before the tests import the models, counting which attention calls reached Aquila's
  kernel (aquila.model.patch.kernel_counts) and which fell back to transformers' attention, and why
  (fallback_counts);
- reports the outcomes of both runs, the tests that pass unpatched and fail patched (with the first line of their
  error), and the share of attention calls that ran on the kernel, as a JSON file (--output) and a markdown summary.

Not run: GenerationTesterMixin and ExportTesterMixin (not in the sdist), PipelineTesterMixin (it reads a tiny-model
summary file the sdist lacks), ConfigTester (its module imports one more missing file; it tests LlamaConfig, which
the patch does not touch), and the tests transformers marks slow or for hardware this machine lacks (skipped, with
transformers' reasons). The Hugging Face Hub is not asked (HF_HUB_OFFLINE=1).
"""

import argparse
import collections
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # run as a script: aquila from this checkout

from aquila.files import write_text_atomically  # noqa: E402  (after the path is set)

KERNEL_SHARE_GOAL = 0.95  # of the patched run's attention calls on Aquila's kernel (issue 18)
TEST_MODULE = "tests/models/llama/test_llama_common.py"
# Modules of the sdist's tests/ the test module imports, besides the stand-ins.
MIXINS_RUN = {"ModelTesterMixin": "tests/test_modeling_common.py",
              "TrainingTesterMixin": "tests/test_training_mixin.py"}
NOT_RUN = {
    "GenerationTesterMixin": "tests/generation/test_utils.py is not in the sdist: an empty stand-in, no generate tests",
    "ExportTesterMixin": "tests/exporters/test_export.py is not in the sdist: an empty stand-in, no export tests",
    "PipelineTesterMixin": "tests/test_pipeline_mixin.py reads tests/utils/tiny_model_summary.json, not in the sdist",
    "ConfigTester": "tests/test_configuration_common.py imports tests/utils/test_configuration_utils.py, not in the "
                    "sdist; it tests LlamaConfig, which the patch does not touch",
}
# Third-party modules transformers' test files import that transformers itself does not need.
TEST_REQUIREMENTS = {"parameterized": "parameterized"}

STAND_INS = {
    "tests/generation/test_utils.py": '''\
        """Stand-in: the sdist lacks transformers' tests/generation/test_utils.py. No generation test runs."""


        class GenerationTesterMixin:
            pass
        ''',
    "tests/exporters/test_export.py": '''\
        """Stand-in: the sdist lacks transformers' tests/exporters/test_export.py. No export test runs."""


        class ExportTesterMixin:
            pass
        ''',
}

LLAMA_TESTS = '''\
    """transformers' common model tests on a tiny Llama, with a tester of Aquila's (transformers' own Llama tester is
    not in the sdist)."""

    import unittest

    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForQuestionAnswering,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
        LlamaModel,
    )

    from tests.generation.test_utils import GenerationTesterMixin
    from tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
    from tests.test_training_mixin import TrainingTesterMixin


    class LlamaTester:
        """A 2-layer Llama small enough for every test to run in seconds, with grouped-query attention (4 query heads
        over 2 key/value heads) and a batch whose padding mask is random (each row keeps its first token), so that the
        attention sees padding anywhere, as in transformers' own suites."""

        def __init__(self, batch_size=13, seq_length=7, vocab_size=99, hidden_size=32, intermediate_size=37,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2):
            self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
            self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
            self.num_hidden_layers = num_hidden_layers
            self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
            self.is_training = True
            self.causal_lm_class = LlamaForCausalLM
            self.sequence_classification_class = LlamaForSequenceClassification

        def get_config(self):
            return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                               intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                               num_attention_heads=self.num_attention_heads,
                               num_key_value_heads=self.num_key_value_heads, max_position_embeddings=512,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)

        def prepare_config_and_inputs_for_common(self):
            input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
            attention_mask = random_attention_mask([self.batch_size, self.seq_length])
            return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


    class LlamaCommonTest(ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin, unittest.TestCase):
        all_model_classes = (LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification, LlamaForQuestionAnswering,
                             LlamaForTokenClassification)

        def setUp(self):
            self.model_tester = LlamaTester()

        def test_generation_tester_mixin_inheritance(self):
            self.skipTest("GenerationTesterMixin is an empty stand-in here: its inheritance proves nothing")
    '''

PLUGIN = '''\
    """pytest plugin: every test's outcome to --aquila-results (JSON); with --aquila-patch, Llama on Aquila's kernels
    (the class-level patch, applied before the tests import the models), and the attention calls' paths, in all and
    per test."""

    import collections
    import json

    import pytest

    PATCHED = False
    OUTCOMES = {}  # test id -> {"outcome": ..., "message": first line of the error or skip reason}
    PER_TEST = {}  # test id -> {"kernel": {path: calls}, "fallback": {reason: calls}}, tests with attention calls


    def pytest_addoption(parser):
        parser.addoption("--aquila-results", required=True, help="JSON file for the outcomes and counts")
        parser.addoption("--aquila-patch", action="store_true", help="apply_aquila_kernels_to_llama() first")


    def pytest_configure(config):
        global PATCHED
        PATCHED = config.getoption("aquila_patch")
        if PATCHED:
            from aquila.model.patch import apply_aquila_kernels_to_llama, reset_counts

            apply_aquila_kernels_to_llama()
            reset_counts()


    def _counts():
        if not PATCHED:
            return collections.Counter(), collections.Counter()
        from aquila.model.patch import fallback_counts, kernel_counts

        return collections.Counter(kernel_counts()), collections.Counter(fallback_counts())


    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        kernel, fallback = _counts()
        yield
        kernel_after, fallback_after = _counts()
        delta = {"kernel": dict(kernel_after - kernel), "fallback": dict(fallback_after - fallback)}
        if delta["kernel"] or delta["fallback"]:
            PER_TEST[item.nodeid] = delta


    def _first_line(report):
        if report.skipped and isinstance(report.longrepr, tuple):
            return report.longrepr[2].removeprefix("Skipped: ")
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr or "")
        return next((line for line in text.splitlines() if line.strip()), "")


    def pytest_runtest_logreport(report):
        """One outcome per test: a failed call (a subtest's included) makes it "failed", a failed setup or teardown
        "error", a skip "skipped"; otherwise "passed"."""
        entry = OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "message": ""})
        if entry["outcome"] in ("failed", "error"):
            return
        if report.failed:
            entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["message"] = _first_line(report)
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
            entry["message"] = _first_line(report)


    def pytest_sessionfinish(session, exitstatus):
        kernel, fallback = _counts()
        results = {"patched": PATCHED, "tests": OUTCOMES, "kernel_counts": dict(kernel),
                   "fallback_counts": dict(fallback), "per_test": PER_TEST}
        with open(session.config.getoption("aquila_results"), "w", encoding="utf-8") as out:
            json.dump(results, out, indent=1)
    '''


# --- Preparing the tests ----------------------------------------------------------------------------------------------


def installed_transformers_version():
    try:
        import transformers
    except ImportError:
        raise SystemExit("transformers_suite: transformers is not installed (pip install transformers)") from None
    return transformers.__version__


def download_sdist(version, directory):
    """The sdist of transformers `version`, fetched by pip into `directory`."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"transformers=={version}", "-d", directory]
    print(f"fetching transformers {version}'s sdist: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    finished = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(Path(directory).glob(f"transformers-{version}.tar.gz"))
    if finished.returncode or not archives:
        raise SystemExit(f"transformers_suite: pip could not download transformers {version}'s sdist "
                         f"({finished.stderr.strip().splitlines()[-1:] or 'no archive'}); pass a local copy with "
                         "--transformers-sdist PATH")
    return archives[0]


def unpack_tests(sdist, version, directory):
    """Extracts the sdist's tests/ into `directory` (members under it only)."""
    prefix = f"transformers-{version}/"
    try:
        archive = tarfile.open(sdist, "r:gz")  # noqa: SIM115  (closed by the with block below)
    except (OSError, tarfile.TarError) as error:
        raise SystemExit(f"transformers_suite: --transformers-sdist {sdist} is not a readable .tar.gz: "
                         f"{error}") from None
    with archive:
        names = archive.getnames()
        if not any(name.startswith(prefix) for name in names):
            found = sorted({name.split("/")[0] for name in names})[:3]
            raise SystemExit(f"transformers_suite: --transformers-sdist {sdist} is not transformers {version}'s sdist "
                             f"(the installed version); its top directories: {found}")
        members = []
        for member in archive.getmembers():
            if member.name.startswith(prefix + "tests/") and (member.isfile() or member.isdir()):
                member.name = member.name.removeprefix(prefix)
                members.append(member)
        common = MIXINS_RUN["ModelTesterMixin"]
        if not any(member.name == common for member in members):
            raise SystemExit(f"transformers_suite: --transformers-sdist {sdist} has no {common}")
        # The "data" filter refuses links and paths out of `directory` (Python >= 3.10.12; before, the names checked
        # above are all there is).
        safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(directory, members=members, **safety)


def write_module(directory, path, text):
    target = Path(directory, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(textwrap.dedent(text), encoding="utf-8")


def prepare(directory, sdist, version):
    """The sdist's tests/ as a package, the stand-ins, the Llama test module and the plugin, under `directory`."""
    unpack_tests(sdist, version, directory)
    for package in ("tests", "tests/generation", "tests/exporters", "tests/models", "tests/models/llama"):
        write_module(directory, f"{package}/__init__.py", "")
    for path, text in STAND_INS.items():
        write_module(directory, path, text)
    write_module(directory, TEST_MODULE, LLAMA_TESTS)
    write_module(directory, "aquila_suite_plugin.py", PLUGIN)


def requirements_directory(directory):
    """A directory holding the test files' own requirements that this interpreter lacks (installed there by pip, not
    into the environment), or None when it has them all."""
    missing = [package for module, package in TEST_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    target = os.path.join(directory, "requirements")
    print(f"installing the test files' requirements {missing} into {target}", file=sys.stderr, flush=True)
    finished = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
                               *missing], capture_output=True, text=True)
    if finished.returncode:
        raise SystemExit(f"transformers_suite: transformers' test files need {missing}, which pip could not install "
                         f"({finished.stderr.strip()[-300:]}); install them in this environment")
    return target


# --- Running ----------------------------------------------------------------------------------------------------------


def run_pytest(directory, requirements, patched, select):
    """One pytest process over the test module; returns the plugin's results and the seconds it took."""
    name = "patched" if patched else "unpatched"
    results_path = os.path.join(directory, f"results-{name}.json")
    log_path = os.path.join(directory, f"pytest-{name}.log")
    command = [sys.executable, "-m", "pytest", TEST_MODULE, "-p", "no:cacheprovider", "-p", "aquila_suite_plugin",
               "--aquila-results", results_path, "-q", "-rN", "--color=no",
               # transformers registers its markers in its repository's conftest.py, which the sdist lacks.
               "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    if patched:
        command.append("--aquila-patch")
    if select:
        command += ["-k", select]
    # The temporary directory first: its `tests` package is transformers', not this repository's.
    paths = [directory, str(REPOSITORY), *([requirements] if requirements else []), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), HF_HUB_OFFLINE="1")
    print(f"running transformers' tests {name} (log: {log_path}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        finished = subprocess.run(command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if finished.returncode not in (0, 1) or not os.path.exists(results_path):  # 0, 1: ran, all passed or some failed
        tail = Path(log_path).read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"transformers_suite: pytest ({name}) stopped with exit status {finished.returncode}:\n{tail}")
    with open(results_path, encoding="utf-8") as results:
        return json.load(results), seconds


# --- Reporting --------------------------------------------------------------------------------------------------------


def outcome_counts(tests):
    return dict(collections.Counter(entry["outcome"] for entry in tests.values()))


def skip_reasons(tests):
    """{reason: tests skipped for it}, most frequent first."""
    return dict(collections.Counter(entry["message"] for entry in tests.values()
                                    if entry["outcome"] == "skipped").most_common())


def regressions(unpatched, patched):
    """{test: first line of the patched error} for the tests that pass unpatched and fail (or error) patched."""
    return {test: patched[test]["message"] for test, entry in unpatched.items()
            if entry["outcome"] == "passed" and patched.get(test, {}).get("outcome") in ("failed", "error")}


def outcome_changes(unpatched, patched):
    """{test: [unpatched outcome, patched outcome]} wherever they differ (a test missing from a run: None)."""
    changes = {}
    for test in {**unpatched, **patched}:
        before, after = (run.get(test, {}).get("outcome") for run in (unpatched, patched))
        if before != after:
            changes[test] = [before, after]
    return dict(sorted(changes.items()))


def kernel_share(kernel_counts, fallback_counts):
    """The share of attention calls that ran on Aquila's kernel, or None when there were none."""
    kernel, fallback = sum(kernel_counts.values()), sum(fallback_counts.values())
    return kernel / (kernel + fallback) if kernel + fallback else None


def fallbacks_by_test(per_test):
    """{reason: {test: calls}}: where each fallback reason came from, most calls first."""
    by_reason = collections.defaultdict(dict)
    for test, counts in per_test.items():
        for reason, calls in counts["fallback"].items():
            by_reason[reason][test] = calls
    return {reason: dict(sorted(tests.items(), key=lambda item: -item[1])) for reason, tests in by_reason.items()}


def build_report(unpatched, patched, seconds, environment):
    """The JSON report from the two runs' plugin results (each: {"tests": {test: {"outcome", "message"}},
    "kernel_counts", "fallback_counts", "per_test"})."""
    kernel, fallback = patched["kernel_counts"], patched["fallback_counts"]
    share = kernel_share(kernel, fallback)
    return {
        "what": "transformers' own common model tests (of its sdist) on a tiny Llama, unpatched and with "
                "apply_aquila_kernels_to_llama() applied to the classes",
        **environment,
        "test_module": TEST_MODULE,
        "mixins_run": MIXINS_RUN,
        "not_run": NOT_RUN,
        "outcomes": {"unpatched": outcome_counts(unpatched["tests"]), "patched": outcome_counts(patched["tests"])},
        "seconds": seconds,
        "pass_unpatched_fail_patched": regressions(unpatched["tests"], patched["tests"]),
        "outcome_changes": outcome_changes(unpatched["tests"], patched["tests"]),
        "attention_calls": {
            "kernel": kernel, "fallback": fallback, "kernel_share": share, "goal": KERNEL_SHARE_GOAL,
            "met": None if share is None else share >= KERNEL_SHARE_GOAL,
            # The kernel never forms the attention weights: those calls cannot run on it.
            "kernel_share_without_output_attentions": kernel_share(
                kernel, {reason: n for reason, n in fallback.items() if reason != "output_attentions"}),
            "fallbacks_by_test": fallbacks_by_test(patched["per_test"]),
        },
        "skip_reasons": {"unpatched": skip_reasons(unpatched["tests"]), "patched": skip_reasons(patched["tests"])},
        "tests": {"unpatched": unpatched["tests"], "patched": patched["tests"]},
    }


OUTCOME_ORDER = ["passed", "failed", "error", "skipped"]


def summary(report):
    """A short markdown summary of a report."""
    outcomes = report["outcomes"]
    names = sorted(set(outcomes["unpatched"]) | set(outcomes["patched"]), key=OUTCOME_ORDER.index)
    selection = f", only those of -k {report['selection']!r}" if report.get("selection") else ""
    lines = [f"transformers {report['transformers']}'s common model tests on Llama "
             f"({', '.join(report['mixins_run'])}{selection}):", "",
             "| run | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for run in ("unpatched", "patched"):
        lines.append(f"| {run} | " + " | ".join(str(outcomes[run].get(name, 0)) for name in names) + " |")
    failing = report["pass_unpatched_fail_patched"]
    lines += ["", f"Pass unpatched, fail patched: {len(failing) or 'none'}"]
    lines += [f"- `{test.rpartition('::')[2]}`: {message}" for test, message in failing.items()]
    calls = report["attention_calls"]
    kernel, fallback = sum(calls["kernel"].values()), sum(calls["fallback"].values())
    if calls["kernel_share"] is None:
        lines += ["", "No attention call was counted."]
    else:
        verdict = "met" if calls["met"] else "not met"
        lines += ["", f"Attention calls on Aquila's kernel: {kernel} of {kernel + fallback} "
                      f"({calls['kernel_share']:.1%}; goal {calls['goal']:.0%}, {verdict}); by path "
                      + ", ".join(f"{path} {n}" for path, n in sorted(calls["kernel"].items())) + "."]
        if fallback:
            by_reason = sorted(calls["fallback"].items(), key=lambda item: -item[1])
            lines.append("Fallbacks by reason: " + ", ".join(f"{reason} {n}" for reason, n in by_reason) + ".")
        without = calls["kernel_share_without_output_attentions"]
        if "output_attentions" in calls["fallback"] and without is not None:
            lines.append(f"Without the calls that ask for the attention weights (output_attentions): {without:.1%} "
                         "on the kernel.")
    lines += ["", "Not run: " + "; ".join(f"{name} ({why})" for name, why in report["not_run"].items()) + "."]
    return "\n".join(lines)


def git(*arguments):
    """git's output in this repository, or None where git cannot tell (no git, not a checkout)."""
    try:
        finished = subprocess.run(["git", *arguments], cwd=REPOSITORY, capture_output=True, text=True)
    except OSError:
        return None
    return finished.stdout.strip() if finished.returncode == 0 else None


def environment(version, sdist):
    import torch

    # What the run depends on: the aquila package and this script, as committed or changed since.
    status = git("status", "--porcelain", "--", "aquila", os.path.relpath(__file__, REPOSITORY))
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "transformers": version, "sdist": os.path.basename(sdist), "torch": torch.__version__,
            "python": platform.python_version(), "device": "cpu", "aquila_commit": git("rev-parse", "HEAD"),
            "aquila_changed_since_commit": None if status is None else bool(status)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    parser.add_argument("--transformers-sdist", metavar="PATH",
                        help="transformers' sdist (.tar.gz) of the installed version (default: pip downloads it)")
    parser.add_argument("--output", metavar="PATH",
                        help="JSON report (default: benchmarks/results/transformers-suite-<version>.json)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.add_argument("-k", dest="select", metavar="EXPRESSION",
                        help="run only the tests pytest's -k EXPRESSION selects (a partial run, for debugging)")
    args = parser.parse_args(argv)

    version = installed_transformers_version()
    output = Path(args.output or REPOSITORY / "benchmarks" / "results" / f"transformers-suite-{version}.json")
    if output.exists() and not args.force:
        parser.error(f"--output {output} exists: pass --force to overwrite it")
    if not output.parent.is_dir():
        parser.error(f"--output {output}: no directory {output.parent}")
    if args.transformers_sdist is not None and not os.path.isfile(args.transformers_sdist):
        parser.error(f"--transformers-sdist {args.transformers_sdist}: no such file")

    with tempfile.TemporaryDirectory(prefix="transformers-suite-") as directory:
        sdist = args.transformers_sdist or download_sdist(version, directory)
        prepare(directory, sdist, version)
        requirements = requirements_directory(directory)
        unpatched, unpatched_seconds = run_pytest(directory, requirements, patched=False, select=args.select)
        patched, patched_seconds = run_pytest(directory, requirements, patched=True, select=args.select)
    report = build_report(unpatched, patched, {"unpatched": unpatched_seconds, "patched": patched_seconds},
                          {**environment(version, sdist), "selection": args.select})
    write_text_atomically(str(output), json.dumps(report, indent=1) + "\n")
    print(summary(report))
    print(f"\nwritten: {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
