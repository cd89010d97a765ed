"""DVC stage `prepare`: check ROMs and task families; write env metadata, task splits, score table."""

from pipeline.prepare import run_prepare
from pipeline.stage import stage_main


def main(config, root):
    run_prepare(config, out_dir=root / "data/prepared", metrics_path=root / "metrics/prepare.json")


if __name__ == "__main__":
    stage_main("prepare", main)
