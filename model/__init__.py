"""The default workload: the MNIST autoencoder, its data segments, deterministic training and weights."""
