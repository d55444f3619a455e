from streamgpu.cli import console

console()
