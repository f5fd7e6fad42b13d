"""The lecture's first half, as pure functions: flow matching (schedules, shifts, the Euler step,
guidance; flow_matching.py), DDPM and its samplers (DDIM, Euler, Karras; ddpm.py), and the algebra
between prediction targets (noise, x0, velocity, score; prediction_targets.py)."""
