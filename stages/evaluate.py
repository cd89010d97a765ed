"""DVC stage `evaluate`: held-out/OOD tasks for the evolved loss, no-op Atari scores, report, promotion."""

from pipeline.evaluation.run import EvaluatePaths, run_evaluate
from pipeline.stage import stage_main


def main(config, root):
    run_evaluate(config, EvaluatePaths.under(root))


if __name__ == "__main__":
    stage_main("evaluate", main)
