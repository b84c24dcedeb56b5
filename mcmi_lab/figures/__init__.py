"""Figures: plots and Eigen-CAM."""
