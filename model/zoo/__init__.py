"""model/zoo: Caffe model definitions (prototxts) and build.py, which writes GoogLeNet and ResNet-50."""
