"""DVC stage `evolve`: Evolved Policy Gradients, an ES search over loss functions (EvoTorch)."""

from pipeline.epg.evolve import run_evolve
from pipeline.stage import stage_main


def main(config, root):
    run_evolve(
        config,
        tasks_path=root / "data/prepared/tasks.json",
        loss_path=root / "models/epg/loss.pt",
        metrics_path=root / "metrics/evolve.json",
        plots_dir=root / "plots/evolve",
        checkpoint_dir=root / "checkpoints/evolve",
    )


if __name__ == "__main__":
    stage_main("evolve", main)
