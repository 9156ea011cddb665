from provisioners import tunnel_to_kernel, find_connection_file

# Find remote kernel connection file
remote_conn_file = find_connection_file('kernel-remote.json')

# Load connection info
with open(remote_conn_file, 'r') as f:
    import json
    remote_conn_info = json.load(f)

# Create SSH tunnels
local_ports = tunnel_to_kernel(
    remote_conn_info,
    sshserver='user@remote-server.com',
    sshkey='/path/to/private_key'
)
print(f"Local tunnel ports: {local_ports}")

# Now connect using local ports
from provisioners import KernelManager
km = KernelManager()

# Update connection info with local tunnel ports
tunnel_conn_info = remote_conn_info.copy()
tunnel_conn_info.update({
    'shell_port': local_ports[0],
    'iopub_port': local_ports[1],
    'stdin_port': local_ports[2],
    'hb_port': local_ports[3],
    'control_port': local_ports[4],
    'ip': '127.0.0.1'  # Connect to local tunnel
})
km.load_connection_info(tunnel_conn_info)
kc = km.client()
