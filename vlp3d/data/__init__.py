"""Pure data code (no Ray): corpus manifests, volume and report preprocessing, phantom corpus."""
