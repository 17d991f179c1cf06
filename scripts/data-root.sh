# Sourced by the other scripts: default FARM_DATA_ROOT to the datasets beside the checkout,
# or to ./data, where torchvision downloads MNIST when it is missing and the internet is reachable.
if [ -z "${FARM_DATA_ROOT:-}" ]; then
  if [ -d ../shared/datasets/MNIST ]; then
    FARM_DATA_ROOT=$(cd ../shared/datasets && pwd)
  else
    FARM_DATA_ROOT=$PWD/data
  fi
fi
export FARM_DATA_ROOT
