"""Is a map faithful: localisation metrics, the deletion/insertion protocols, the randomisation
check, and the per-image evaluation that ``mmdet-cam-eval`` and the hook run."""
