"""Operations: launching a run (simulation or local deployment), real deployments, certificates, the proxy."""
