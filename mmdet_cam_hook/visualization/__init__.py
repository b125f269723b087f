"""Drawing maps and detections into panels, and delivering them to MMEngine's visualizer."""
