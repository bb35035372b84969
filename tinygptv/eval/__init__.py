"""Benchmark evaluation of TinyGPT-V: the paper's Table 2 protocol (``paper`` mode) and community metrics
(``standard`` mode), two phases (predict → ``answers.jsonl`` → score), resumable.

    from tinygptv.eval import run_eval
    run_eval(tinygptv.load("ckpt"), "gqa,vsr,iconqa,vizwiz,hm", data_root="data", out_dir="eval-results")
"""

from tinygptv.eval.base import Benchmark, Request, Sample
from tinygptv.eval.normalize import normalize_answer, vqa_accuracy
from tinygptv.eval.predictor import ModelPredictor, Predictor, as_predictor
from tinygptv.eval.registry import BENCHMARKS, GROUPS, get_benchmark, resolve_benchmarks
from tinygptv.eval.runner import predict, rescore, run_eval, score_answers

__all__ = ["run_eval", "rescore", "predict", "score_answers", "BENCHMARKS", "GROUPS", "get_benchmark",
           "resolve_benchmarks", "Benchmark", "Sample", "Request", "Predictor", "ModelPredictor", "as_predictor",
           "normalize_answer", "vqa_accuracy"]
