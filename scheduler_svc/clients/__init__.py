"""The scheduler's clients of the verifier and the proposers: protobuf stays inside these modules."""
