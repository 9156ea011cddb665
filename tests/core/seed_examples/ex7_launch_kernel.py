from provisioners import launch_kernel
import subprocess
import sys

# Launch a Python kernel directly
kernel_cmd = [
    sys.executable, '-m', 'ipykernel_launcher',
    '-f', 'connection-file.json'
]

# Launch with custom environment
custom_env = {'PYTHONPATH': '/custom/path'}
kernel_proc = launch_kernel(
    kernel_cmd,
    env=custom_env,
    cwd='/custom/working/dir',
    independent=True  # Kernel survives if parent dies
)
print(f"Kernel PID: {kernel_proc.pid}")

# Monitor kernel status
if kernel_proc.poll() is None:
    print("Kernel is running")
else:
    print(f"Kernel exited with code: {kernel_proc.returncode}")

# Terminate kernel when done
kernel_proc.terminate()
kernel_proc.wait()
