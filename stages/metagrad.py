"""DVC stage `metagrad`: IMPALA with meta-learned gamma/lambda, every configured variant and game."""

from pipeline.metagrad.run import run_metagrad
from pipeline.stage import stage_main


def main(config, root):
    run_metagrad(
        config,
        models_dir=root / "models/metagrad",
        metrics_path=root / "metrics/metagrad.json",
        plots_dir=root / "plots/metagrad",
        checkpoint_dir=root / "checkpoints/metagrad",
    )


if __name__ == "__main__":
    stage_main("metagrad", main)
