"""The maths of the project, free of files and Ray: architecture descriptions, analytic and empirical kernels,
tiled Grams, kernel regression and the finite-width GP estimator."""
