"""Proposer service: speculative candidates from prompt lookup (ngram) or a draft model, over gRPC.

`base` holds the contract (ProposalRequest, Proposal, Proposer), one proposer per module (`ngram`,
`draft`), `server` the grpc.aio servicer, `config` the service configuration.
"""

from proposer_svc.base import Proposal, ProposalRequest, Proposer

__all__ = ["Proposal", "ProposalRequest", "Proposer"]
