"""Checks of scripts/transformers_suite.py's own parts, offline and without transformers' sdist: the report and
summary from two runs' results, the pytest plugin's outcome per test, and the refusals of bad arguments. (The suite
itself takes minutes: run the script.)"""

import io
import json
import subprocess
import sys
import tarfile

import pytest

from tests.helpers import load_script

suite = load_script("transformers_suite")
ENVIRONMENT = {"transformers": "5.25.0"}


def run_results(outcomes, kernel=None, fallback=None, per_test=None):
    """A run as the plugin writes it, from {test: outcome or (outcome, message)}."""
    tests = {}
    for test, outcome in outcomes.items():
        outcome, message = outcome if isinstance(outcome, tuple) else (outcome, "")
        tests[f"tests/models/llama/test_llama_common.py::LlamaCommonTest::{test}"] = {"outcome": outcome,
                                                                                      "message": message}
    return {"tests": tests, "kernel_counts": kernel or {}, "fallback_counts": fallback or {},
            "per_test": per_test or {}}


def test_report_and_summary_from_two_runs():
    unpatched = run_results({"test_training": "passed", "test_determinism": "passed",
                             "test_flash": ("skipped", "test requires Flash Attention"),
                             "test_broken_anyway": ("failed", "AssertionError: x")})
    attentions = "tests/models/llama/test_llama_common.py::LlamaCommonTest::test_attention_outputs"
    patched = run_results({"test_training": ("failed", "RuntimeError: shape mismatch"), "test_determinism": "passed",
                           "test_flash": ("skipped", "test requires Flash Attention"),
                           "test_broken_anyway": "passed"},
                          kernel={"dense": 60, "varlen": 30}, fallback={"output_attentions": 8, "custom_mask": 2},
                          per_test={attentions: {"kernel": {}, "fallback": {"output_attentions": 8}}})
    report = suite.build_report(unpatched, patched, {"unpatched": 2.0, "patched": 1.0}, ENVIRONMENT)

    assert report["outcomes"] == {"unpatched": {"passed": 2, "skipped": 1, "failed": 1},
                                  "patched": {"failed": 1, "passed": 2, "skipped": 1}}
    training = "tests/models/llama/test_llama_common.py::LlamaCommonTest::test_training"
    assert report["pass_unpatched_fail_patched"] == {training: "RuntimeError: shape mismatch"}
    assert report["outcome_changes"] == {
        "tests/models/llama/test_llama_common.py::LlamaCommonTest::test_broken_anyway": ["failed", "passed"],
        training: ["passed", "failed"]}
    calls = report["attention_calls"]
    assert calls["kernel_share"] == pytest.approx(90 / 100) and calls["met"] is False
    assert calls["kernel_share_without_output_attentions"] == pytest.approx(90 / 92)
    assert calls["fallbacks_by_test"] == {"output_attentions": {attentions: 8}}
    assert report["skip_reasons"]["patched"] == {"test requires Flash Attention": 1}
    json.dumps(report)  # what the script writes

    text = suite.summary(report)
    assert "| run | passed | failed | skipped |" in text
    assert "| unpatched | 2 | 1 | 1 |" in text and "| patched | 2 | 1 | 1 |" in text
    assert "Pass unpatched, fail patched: 1\n- `test_training`: RuntimeError: shape mismatch" in text
    assert "90 of 100 (90.0%; goal 95%, not met); by path dense 60, varlen 30." in text
    assert "Fallbacks by reason: output_attentions 8, custom_mask 2." in text
    assert "(output_attentions): 97.8% on the kernel." in text
    assert "Not run: GenerationTesterMixin" in text


def test_summary_of_a_partial_run_without_attention_calls_or_regressions():
    results = run_results({"test_save_load": "passed"})
    report = suite.build_report(results, results, {"unpatched": 1.0, "patched": 1.0},
                                {**ENVIRONMENT, "selection": "save_load"})
    assert report["attention_calls"]["kernel_share"] is None and report["attention_calls"]["met"] is None
    text = suite.summary(report)
    assert "(ModelTesterMixin, TrainingTesterMixin, only those of -k 'save_load'):" in text
    assert "Pass unpatched, fail patched: none" in text and "No attention call was counted." in text


def test_the_plugin_gives_one_outcome_per_test_with_the_first_line_of_its_error(tmp_path):
    (tmp_path / "aquila_suite_plugin.py").write_text(suite.textwrap.dedent(suite.PLUGIN), encoding="utf-8")
    (tmp_path / "test_cases.py").write_text(suite.textwrap.dedent('''\
        import unittest

        import pytest


        class Cases(unittest.TestCase):
            def test_passes(self):
                with self.subTest(part=1):
                    pass

            def test_one_subtest_fails(self):
                for part in range(3):
                    with self.subTest(part=part):
                        self.assertLess(part, 2, "part too large\\nsecond line")

            def test_skips(self):
                self.skipTest("needs a GPU")


        @pytest.fixture
        def broken():
            raise RuntimeError("set-up failed")


        def test_setup_fails(broken):
            pass
        '''), encoding="utf-8")
    results = tmp_path / "results.json"
    finished = subprocess.run([sys.executable, "-m", "pytest", "test_cases.py", "-p", "no:cacheprovider", "-p",
                               "aquila_suite_plugin", "--aquila-results", str(results), "-q"],
                              cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": ""}, capture_output=True,
                              text=True)
    assert finished.returncode == 1, finished.stdout + finished.stderr
    written = json.loads(results.read_text())
    too_large = "AssertionError: 2 not less than 2 : part too large"
    assert written["tests"] == {
        "test_cases.py::Cases::test_passes": {"outcome": "passed", "message": ""},
        "test_cases.py::Cases::test_one_subtest_fails": {"outcome": "failed", "message": too_large},
        "test_cases.py::Cases::test_skips": {"outcome": "skipped", "message": "needs a GPU"},
        "test_cases.py::test_setup_fails": {"outcome": "error", "message": "RuntimeError: set-up failed"},
    }
    assert written["patched"] is False and written["kernel_counts"] == {} and written["per_test"] == {}


def test_bad_arguments_are_refused_naming_them(tmp_path, capsys):
    existing = tmp_path / "report.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit):
        suite.main(["--output", str(existing)])
    assert f"--output {existing} exists: pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.main(["--output", str(tmp_path / "new.json"), "--transformers-sdist", str(tmp_path / "missing.tar.gz")])
    assert "--transformers-sdist" in capsys.readouterr().err and existing.read_text() == "{}"


def test_an_archive_of_another_version_is_refused(tmp_path):
    sdist = tmp_path / "transformers-4.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        data = b"class ModelTesterMixin: pass\n"
        member = tarfile.TarInfo("transformers-4.0.0/tests/test_modeling_common.py")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    with pytest.raises(SystemExit, match=r"--transformers-sdist .* is not transformers 5\.25\.0's sdist"):
        suite.unpack_tests(sdist, "5.25.0", tmp_path / "unpacked")
    assert not (tmp_path / "unpacked").exists()
