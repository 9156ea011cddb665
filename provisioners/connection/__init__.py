"""The connection layer every target shares: connection files, the cluster-aware port
cache, SSH links and the tunnels over them. It knows no target."""
