"""verifier_svc: the target model behind the specdec.v1.Verifier gRPC service (Prefill, Verify, Release, Info)."""
