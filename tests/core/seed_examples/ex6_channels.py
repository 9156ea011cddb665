from provisioners import KernelManager
import zmq

km = KernelManager()
km.start_kernel()

# Connect to individual channels
context = zmq.Context()

# Connect to shell channel
shell_socket = km.connect_shell()
shell_socket.send_multipart([b'execute_request', b'print("hello")'])

# Connect to iopub channel
iopub_socket = km.connect_iopub()
message = iopub_socket.recv_multipart()

# Clean up
shell_socket.close()
iopub_socket.close()
context.term()
km.shutdown_kernel()
