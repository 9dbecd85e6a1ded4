"""Device meshes and logical-axis sharding."""
