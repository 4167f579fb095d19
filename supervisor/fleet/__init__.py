"""Configuration for what runs in front of several llmsup nodes: HAProxy and Kubernetes."""
