"""jupyter_kernel_test against the flamebook kernel, with the samples the stock python3 kernel passes."""
import jupyter_kernel_test as jkt


class TestFlamebookKernel(jkt.KernelTests):
    kernel_name = "flamebook"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n"]
    incomplete_code_samples = ['print("""hello']
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise Exception('boom')"
    code_execute_result = [{"code": "6*7", "result": "42"}]
    code_display_data = [{"code": "from IPython.display import HTML, display; display(HTML('<b>x</b>'))",
                          "mime": "text/html"}]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail",)
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"
