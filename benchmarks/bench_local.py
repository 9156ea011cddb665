"""Start-to-kernel_info: our local provisioner against jupyter_client's LocalProvisioner."""

from __future__ import annotations

import asyncio

from benchmarks.common import LOCAL_ARGV, kernelspecs, medians, report, start_to_kernel_info


async def run(runs: int = 7) -> bool:
    ksm = kernelspecs(
        {
            "ours": ("cluster-local-provisioner", {}, LOCAL_ARGV),
            "jupyter_client": ("local-provisioner", {}, LOCAL_ARGV),
        }
    )
    await start_to_kernel_info(ksm, "ours")  # warm imports and caches once
    result = await medians(
        runs,
        {
            "ours": lambda: start_to_kernel_info(ksm, "ours"),
            "jupyter_client": lambda: start_to_kernel_info(ksm, "jupyter_client"),
        },
    )
    return report(
        "local start -> kernel_info (median)", result["ours"], result["jupyter_client"], 1.05
    )


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
