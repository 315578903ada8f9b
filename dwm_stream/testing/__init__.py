"""Test and benchmark tooling that training never imports: a fault-injecting S3 proxy (``fault_proxy``) and a
synthetic corpus in the converted format (``synthetic``)."""
